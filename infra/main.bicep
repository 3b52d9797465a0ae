// deploychain on Azure: the function app (Flex Consumption, custom handler) and everything it
// talks to, with one user-assigned managed identity holding least-privilege roles.
// `azd up` (azure.yaml) or `az deployment group create -g RG -f infra/main.bicep -p infra/main.<env>.bicepparam`.
targetScope = 'resourceGroup'

@description('Short environment name (dev, prod): part of every resource name.')
@minLength(2)
@maxLength(10)
param environmentName string

@description('Region of every resource.')
param location string = resourceGroup().location

@description('Resource groups holding the VM scale sets the pipeline deploys to (Virtual Machine Contributor there).')
param targetResourceGroups array = []

@description('The GitHub webhook secret (stored in Key Vault).')
@secure()
param githubWebhookSecret string

@description('The key that signs approval links, at least 32 characters (stored in Key Vault).')
@secure()
param approvalSigningKey string

@description('The Azure DevOps service hook password (stored in Key Vault; empty: no Azure DevOps).')
@secure()
param azureDevOpsWebhookSecret string = ''

@description('Where approval notices go (a generic JSON webhook, e.g. a Logic App); stored in Key Vault.')
@secure()
param notifyUrl string

@description('Optional scale sets to create as deploy targets (in this resource group): [{ name, app, stage, imageId, instances }].')
param scaleSets array = []

@description('The SSH public key of the scale sets\' admin user.')
param sshPublicKey string = ''

var suffix = uniqueString(resourceGroup().id, environmentName)
var tags = { 'azd-env-name': environmentName, app: 'deploychain' }

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: 'id-deploychain-${environmentName}'
  location: location
  tags: tags
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  params: { name: 'deploychain-${environmentName}', location: location, tags: tags }
}

module bus 'modules/servicebus.bicep' = {
  name: 'servicebus'
  params: {
    name: 'sb-deploychain-${suffix}'
    location: location
    tags: tags
    principalId: identity.properties.principalId
  }
}

module vault 'modules/keyvault.bicep' = {
  name: 'keyvault'
  params: {
    name: 'kv-dc-${suffix}'
    location: location
    tags: tags
    principalId: identity.properties.principalId
    secrets: {
      'github-webhook-secret': githubWebhookSecret
      'approval-signing-key': approvalSigningKey
      'azure-devops-webhook-secret': azureDevOpsWebhookSecret
      'notify-url': notifyUrl
      'appinsights-connection-string': monitoring.outputs.connectionString
    }
  }
}

module app 'modules/functionapp.bicep' = {
  name: 'functionapp'
  params: {
    name: 'func-deploychain-${suffix}'
    storageName: 'stdc${suffix}'
    location: location
    tags: union(tags, { 'azd-service-name': 'handler' })
    identityId: identity.id
    identityClientId: identity.properties.clientId
    principalId: identity.properties.principalId
    serviceBusNamespace: bus.outputs.fullyQualifiedNamespace
    vaultUri: vault.outputs.uri
    logAnalyticsId: monitoring.outputs.workspaceId
  }
}

// Rollouts: Virtual Machine Contributor on each target resource group, nothing wider.
module targets 'modules/target-access.bicep' = [for rg in targetResourceGroups: {
  name: 'target-access-${rg}'
  scope: resourceGroup(rg)
  params: { principalId: identity.properties.principalId }
}]

module targetScaleSets 'modules/scaleset.bicep' = [for ss in scaleSets: {
  name: 'scaleset-${ss.name}'
  params: {
    name: ss.name
    location: location
    tags: union(tags, { app: ss.app, environment: ss.stage })
    imageId: ss.imageId
    instances: ss.instances
    sshPublicKey: sshPublicKey
  }
}]

output AZURE_FUNCTION_APP_NAME string = app.outputs.name
output DEPLOYCHAIN_PUBLIC_URL string = app.outputs.url
output SERVICE_BUS_NAMESPACE string = bus.outputs.fullyQualifiedNamespace
output KEY_VAULT_URI string = vault.outputs.uri
