// The function app: Linux, Flex Consumption, custom handler (`handler`, see host.json), its
// storage account (identity-based: no shared keys), app settings as Key Vault references.
param name string
param storageName string
param location string
param tags object
@description('The user-assigned identity the app runs as.')
param identityId string
param identityClientId string
param principalId string
@description('`ns.servicebus.windows.net`: the triggers and the publisher connect with the identity.')
param serviceBusNamespace string
param vaultUri string
param logAnalyticsId string
@description('The secret settings this deployment sets (names from ../appsettings.json `secrets`): each becomes a Key Vault reference.')
param secretSettings array
@description('Optional per-deployment settings ({ NAME: value }, names from ../appsettings.json `deployment.optional`).')
param optionalSettings object = {}
@description('A subnet delegated to Microsoft.App/environments for VNet integration (decision 0020: the acceptance checks reach the scale sets\' internal load balancers); empty: none.')
param virtualNetworkSubnetId string = ''

// The one source of the app's settings, shared with the local stack (decision 0021): the fixed
// values, and which vault secret each secret setting references.
var source = loadJsonContent('../appsettings.json')
var fixedSettings = [for s in items(source.settings): { name: s.key, value: s.value }]
var secretReferences = [for s in secretSettings: {
  name: s
  value: '@Microsoft.KeyVault(SecretUri=${vaultUri}secrets/${source.secrets[s].secret})'
}]
var deploymentOptional = [for s in items(optionalSettings): { name: s.key, value: s.value }]

var packageContainer = 'app-package'

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // checkov:skip=CKV_AZURE_35:The Functions host and the package deployment reach it over the public endpoint (the optional VNet integration is for the scale sets' private load balancers, decision 0020, not for storage); shared keys are off, access is the app identity's RBAC.
  // checkov:skip=CKV_AZURE_59:Same reason; no blob is public (allowBlobPublicAccess is false).
  // checkov:skip=CKV_AZURE_206:Zone-redundant (ZRS); the runs' record is the store, which needs no second region.
  // checkov:skip=CKV_AZURE_43:The name is stdc + uniqueString (17 lower-case alphanumerics), valid; the check cannot evaluate it.
  name: storageName
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: { name: 'Standard_ZRS' }
  properties: {
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    publicNetworkAccess: 'Enabled'
    networkAcls: { bypass: 'AzureServices', defaultAction: 'Allow' }
  }
}

resource blobs 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    deleteRetentionPolicy: { enabled: true, days: 7 }
  }
}

resource container 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobs
  name: packageContainer
  properties: { publicAccess: 'None' }
}

// Storage Blob Data Owner (the host's leases and the package), Storage Table Data Contributor
// (the run store), Storage Queue Data Contributor (the host's internals).
var storageRoles = ['b7e6dc6d-f1e8-4753-8033-0f276bb0955b', '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3', '974c5e8b-45b9-4653-ba55-5f855dd0fb88']
resource storageAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for r in storageRoles: {
  name: guid(storage.id, principalId, r)
  scope: storage
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', r)
  }
}]

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  // checkov:skip=CKV_AZURE_225:Flex Consumption zone redundancy is a per-region option; turn it on where the region offers it.
  name: 'plan-${name}'
  location: location
  tags: tags
  kind: 'functionapp'
  sku: { name: 'FC1', tier: 'FlexConsumption' }
  properties: { reserved: true }
}

resource site 'Microsoft.Web/sites@2024-04-01' = {
  // checkov:skip=CKV_AZURE_222:GitHub, Azure DevOps, Event Grid and approvers' browsers must reach the webhooks and approval pages.
  // checkov:skip=CKV_AZURE_17:Those callers present no client certificates; webhooks are signed, approvals carry signed links.
  // checkov:skip=CKV_AZURE_212:Scale to zero is intended: Service Bus holds events while no instance runs.
  // checkov:skip=CKV_AZURE_213:Health check paths are not available on Flex Consumption; the host checks the handler itself.
  name: name
  location: location
  tags: tags
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: { '${identityId}': {} }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    clientCertMode: 'Optional'
    keyVaultReferenceIdentity: identityId
    // Flex Consumption VNet integration (outbound): https://learn.microsoft.com/en-us/azure/azure-functions/flex-consumption-how-to#enable-virtual-network-integration
    virtualNetworkSubnetId: empty(virtualNetworkSubnetId) ? null : virtualNetworkSubnetId
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${packageContainer}'
          authentication: { type: 'UserAssignedIdentity', userAssignedIdentityResourceId: identityId }
        }
      }
      scaleAndConcurrency: { maximumInstanceCount: 40, instanceMemoryMB: 2048 }
      runtime: { name: 'custom', version: '1.0' }
    }
    siteConfig: {
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
      // ../appsettings.json `settings`, then `deployment.always` (computed here), the secrets as
      // Key Vault references, then the optional per-deployment settings given.
      appSettings: concat(fixedSettings, [
        { name: 'AzureWebJobsStorage__accountName', value: storage.name }
        { name: 'AzureWebJobsStorage__clientId', value: identityClientId }
        { name: 'ServiceBusConnection__fullyQualifiedNamespace', value: serviceBusNamespace }
        { name: 'ServiceBusConnection__clientId', value: identityClientId }
        { name: 'AZURE_CLIENT_ID', value: identityClientId }
        { name: 'DEPLOYCHAIN_PUBLIC_URL', value: 'https://${name}.azurewebsites.net' }
        { name: 'DEPLOYCHAIN_STORE', value: 'table:${storage.properties.primaryEndpoints.table}' }
      ], secretReferences, deploymentOptional)
    }
  }
}

resource diagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'logs'
  scope: site
  properties: {
    workspaceId: logAnalyticsId
    logs: [ { category: 'FunctionAppLogs', enabled: true } ]
  }
}

output name string = site.name
output url string = 'https://${site.properties.defaultHostName}'
