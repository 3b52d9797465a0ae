// deploychain on Azure: the function app (Flex Consumption, custom handler) and everything it
// talks to, with one user-assigned managed identity holding least-privilege roles.
// `azd up` (azure.yaml; parameters from infra/main.parameters.json, decision 0020) or
// `az deployment group create -g RG -f infra/main.bicep -p infra/main.<env>.bicepparam`.
targetScope = 'resourceGroup'

@description('Short environment name (dev, prod): part of every resource name.')
@minLength(2)
@maxLength(10)
param environmentName string

@description('Region of every resource.')
param location string = resourceGroup().location

@description('Names of the resource groups (in this subscription) holding the VM scale sets the pipeline deploys to: Virtual Machine Contributor there.')
param targetResourceGroups array = []

// Secrets (each stored in Key Vault; the app gets a Key Vault reference, see infra/appsettings.json
// `secrets`). An empty optional one is neither stored nor set: the handler refuses empty secrets.
@description('The key that signs approval links, at least 32 characters (stored in Key Vault).')
@secure()
param approvalSigningKey string

@description('The GitHub webhook secret (stored in Key Vault; empty: no GitHub webhooks).')
@secure()
param githubWebhookSecret string = ''

@description('The Azure DevOps service hook password (stored in Key Vault; empty: no Azure DevOps).')
@secure()
param azureDevOpsWebhookSecret string = ''

@description('Where approval notices go: a generic JSON webhook, e.g. a Logic App (stored in Key Vault). One of notifyUrl, notifyTeamsUrl, notifySlackUrl is needed when a stage needs approval.')
@secure()
param notifyUrl string = ''

@description('A Teams Workflows webhook for approval notices (stored in Key Vault; empty: none).')
@secure()
param notifyTeamsUrl string = ''

@description('A Slack incoming webhook for approval notices (stored in Key Vault; empty: none).')
@secure()
param notifySlackUrl string = ''

@description('A fine-grained GitHub token with Actions: read and write, for workflow_dispatch (stored in Key Vault; empty: none).')
@secure()
param githubToken string = ''

@description('Instead of githubToken: a GitHub App\'s PEM private key (stored in Key Vault), with githubAppId and githubAppInstallationId.')
@secure()
param githubAppPrivateKey string = ''

@description('The API token of jenkinsUser (stored in Key Vault; empty: no Jenkins).')
@secure()
param jenkinsApiToken string = ''

// Where builds are started (infra/appsettings.json `deployment.optional`); empty: not set.
@description('GitHub Enterprise Server\'s REST API, https://HOST/api/v3 (empty: api.github.com).')
param githubApiUrl string = ''
@description('The GitHub App\'s id (with githubAppPrivateKey).')
param githubAppId string = ''
@description('The GitHub App\'s installation id (with githubAppPrivateKey).')
param githubAppInstallationId string = ''
@description('https://dev.azure.com/{organization}: where Azure Pipelines runs are queued (the app\'s identity is added to the organization).')
param azureDevOpsOrgUrl string = ''
@description('The Azure DevOps project of pipelines that build GitHub repositories.')
param azureDevOpsProject string = ''
@description('The Jenkins controller builds are queued on.')
param jenkinsUrl string = ''
@description('The Jenkins user whose API token (jenkinsApiToken) queues builds.')
param jenkinsUser string = ''

@description('Optional scale sets to create as deploy targets (in this resource group): [{ name, app, stage, imageId, instances }].')
param scaleSets array = []

@description('The SSH public key of the scale sets\' admin user.')
param sshPublicKey string = ''

@description('Encryption at host for the scale sets\' instances. Needs the subscription feature Microsoft.Compute/EncryptionAtHost registered (az feature register --namespace Microsoft.Compute --name EncryptionAtHost); false where it cannot be.')
param scaleSetEncryptionAtHost bool = true

// The network (decision 0020): the acceptance checks reach the scale sets over private addresses
// through the function app's VNet integration. With `scaleSets` and no `appSubnetId`, a virtual
// network is created (integration subnet, scale-set subnet behind internal load balancers, private
// DNS zone). Teams with their own network give the subnets instead.
@description('An existing subnet for the function app\'s VNet integration, delegated to Microsoft.App/environments (empty: the one created with scaleSets, or no integration).')
param appSubnetId string = ''
@description('With appSubnetId: the existing subnet the created scale sets and their internal load balancers go in.')
param targetSubnetId string = ''
@description('The created network\'s address space, its integration subnet and its scale-set subnet.')
param networkAddressPrefixes object = { vnet: '10.20.0.0/16', app: '10.20.0.0/24', targets: '10.20.1.0/24' }

// One role for every feature the policy uses, each assigned only when its parameter is given
// (decision 0020; the README's "Deploy to Azure" has the table).
@description('Compute Gallery resource ids the rollouts and `ci` images read image versions from: Compute Gallery Image Reader on each.')
param galleries array = []
@description('Compute Gallery resource ids whose VM Application versions are deployed (`deploy = "vm-application"`): Reader on each (no narrower built-in role reads application versions).')
param applicationGalleries array = []
@description('VM Image Builder: the resource id of the user-assigned identity the apps\' base image templates run as (Managed Identity Operator on it, to give it to each run\'s template).')
param imageBuilderIdentityId string = ''
@description('VM Image Builder: resource ids of the resource groups holding the base templates, where each run\'s template is created (custom role: image templates only).')
param imageTemplateResourceGroups array = []
@description('VM Image Builder: gallery ids the bakes distribute into (with imageBuilderIdentityId): the builder identity may create image versions there, the app reads them.')
param imageBuilderGalleries array = []
@description('VM Image Builder: virtual network ids the base templates build in (vmProfile.vnetConfig; with imageBuilderIdentityId): the builder identity may join their subnets.')
param imageBuilderVirtualNetworks array = []
@description('AKS stages: [{ cluster: <managed cluster id>, namespace: <the stage\'s kubernetes.namespace> }]: Cluster User Role on each cluster, RBAC Writer on each namespace.')
param aksNamespaces array = []
@description('Container registry ids that promotion imports from (an app\'s image.registry) or into (a stage\'s registry): Container Registry Data Importer and Data Reader on each.')
param containerRegistries array = []

var suffix = uniqueString(resourceGroup().id, environmentName)
var tags = { 'azd-env-name': environmentName, app: 'deploychain' }

// The function app's integration subnet: the given one, else the created network's (with scaleSets).
var createNetwork = !empty(scaleSets) && empty(appSubnetId)
var integrationSubnetId = !empty(appSubnetId) ? appSubnetId : (createNetwork ? network.outputs.appSubnetId : '')

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
    secrets: union({
        'approval-signing-key': approvalSigningKey
        'appinsights-connection-string': monitoring.outputs.connectionString
      },
      empty(githubWebhookSecret) ? {} : { 'github-webhook-secret': githubWebhookSecret },
      empty(azureDevOpsWebhookSecret) ? {} : { 'azure-devops-webhook-secret': azureDevOpsWebhookSecret },
      empty(notifyUrl) ? {} : { 'notify-url': notifyUrl },
      empty(notifyTeamsUrl) ? {} : { 'notify-teams-url': notifyTeamsUrl },
      empty(notifySlackUrl) ? {} : { 'notify-slack-url': notifySlackUrl },
      empty(githubToken) ? {} : { 'github-token': githubToken },
      empty(githubAppPrivateKey) ? {} : { 'github-app-private-key': githubAppPrivateKey },
      empty(jenkinsApiToken) ? {} : { 'jenkins-api-token': jenkinsApiToken })
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
    virtualNetworkSubnetId: integrationSubnetId
    // The secret settings this deployment has: those stored in the vault above.
    secretSettings: concat(['APPROVAL_SIGNING_KEY', 'APPLICATIONINSIGHTS_CONNECTION_STRING'],
      empty(githubWebhookSecret) ? [] : ['GITHUB_WEBHOOK_SECRET'],
      empty(azureDevOpsWebhookSecret) ? [] : ['AZURE_DEVOPS_WEBHOOK_SECRET'],
      empty(notifyUrl) ? [] : ['DEPLOYCHAIN_NOTIFY_URL'],
      empty(notifyTeamsUrl) ? [] : ['DEPLOYCHAIN_NOTIFY_TEAMS_URL'],
      empty(notifySlackUrl) ? [] : ['DEPLOYCHAIN_NOTIFY_SLACK_URL'],
      empty(githubToken) ? [] : ['GITHUB_TOKEN'],
      empty(githubAppPrivateKey) ? [] : ['GITHUB_APP_PRIVATE_KEY'],
      empty(jenkinsApiToken) ? [] : ['JENKINS_API_TOKEN'])
    optionalSettings: union(empty(githubApiUrl) ? {} : { GITHUB_API_URL: githubApiUrl },
      empty(githubAppId) ? {} : { GITHUB_APP_ID: githubAppId },
      empty(githubAppInstallationId) ? {} : { GITHUB_APP_INSTALLATION_ID: githubAppInstallationId },
      empty(azureDevOpsOrgUrl) ? {} : { AZURE_DEVOPS_ORG_URL: azureDevOpsOrgUrl },
      empty(azureDevOpsProject) ? {} : { AZURE_DEVOPS_PROJECT: azureDevOpsProject },
      empty(jenkinsUrl) ? {} : { JENKINS_URL: jenkinsUrl },
      empty(jenkinsUser) ? {} : { JENKINS_USER: jenkinsUser })
  }
}

// Rollouts: Virtual Machine Contributor on each target resource group, nothing wider.
module targets 'modules/target-access.bicep' = [for rg in targetResourceGroups: {
  name: 'target-access-${rg}'
  scope: resourceGroup(rg)
  params: { principalId: identity.properties.principalId }
}]

module network 'modules/network.bicep' = if (createNetwork) {
  name: 'network'
  params: {
    name: 'deploychain-${environmentName}'
    location: location
    tags: tags
    addressPrefix: networkAddressPrefixes.vnet
    appSubnetPrefix: networkAddressPrefixes.app
    targetSubnetPrefix: networkAddressPrefixes.targets
  }
}

module targetScaleSets 'modules/scaleset.bicep' = [for ss in scaleSets: {
  name: 'scaleset-${ss.name}'
  params: {
    name: ss.name
    location: location
    tags: union(tags, { app: ss.app, environment: ss.stage })
    imageId: ss.imageId
    instances: ss.instances
    sshPublicKey: sshPublicKey
    subnetId: createNetwork ? network.outputs.targetSubnetId : targetSubnetId
    encryptionAtHost: scaleSetEncryptionAtHost
    dnsZoneName: createNetwork ? network.outputs.dnsZoneName : ''
  }
}]

// Roles, one per feature, each only when its parameter is given (decision 0020). Built-in role ids
// from https://learn.microsoft.com/en-us/azure/role-based-access-control/built-in-roles (the page per
// category is cited beside each id, in the modules that assign them).
// Compute Gallery Image Reader: https://learn.microsoft.com/en-us/azure/role-based-access-control/built-in-roles/compute#compute-gallery-image-reader
var computeGalleryImageReader = 'cf7c76d2-98a3-4358-a134-615aa78bf44d'
// Reader: https://learn.microsoft.com/en-us/azure/role-based-access-control/built-in-roles/general#reader
var reader = 'acdd72a7-3385-48ef-bd42-f606fba81ae7'

// Rollouts to the scale sets created here: Virtual Machine Contributor on this resource group too
// (unless targetResourceGroups lists it already).
module ownScaleSets 'modules/target-access.bicep' = if (!empty(scaleSets) && !contains(targetResourceGroups, resourceGroup().name)) {
  name: 'target-access-self'
  params: { principalId: identity.properties.principalId }
}

// Galleries: the scale-set PATCH references an image version (or a VM Application version) the
// caller must be able to read; bakes and `ci` images look versions up. The galleries bakes
// distribute into are read too.
var imageGalleries = union(galleries, imageBuilderGalleries)
module galleryImageRead 'modules/gallery-read.bicep' = [for g in imageGalleries: {
  name: 'dc-${environmentName}-gallery-images-${uniqueString(g)}'
  scope: resourceGroup(split(g, '/')[2], split(g, '/')[4])
  params: { principalId: identity.properties.principalId, galleryName: last(split(g, '/')), roleId: computeGalleryImageReader }
}]

module galleryApplicationRead 'modules/gallery-read.bicep' = [for g in union(applicationGalleries, []): {
  name: 'dc-${environmentName}-gallery-apps-${uniqueString(g)}'
  scope: resourceGroup(split(g, '/')[2], split(g, '/')[4])
  params: { principalId: identity.properties.principalId, galleryName: last(split(g, '/')), roleId: reader }
}]

// VM Image Builder: image templates in the base templates' resource groups, the builder identity
// given to each run's template, and that identity's own rights on the galleries and networks.
module imageTemplates 'modules/image-templates-access.bicep' = [for rg in union(imageTemplateResourceGroups, []): {
  name: 'dc-${environmentName}-image-templates-${uniqueString(rg)}'
  scope: resourceGroup(split(rg, '/')[2], split(rg, '/')[4])
  params: { principalId: identity.properties.principalId }
}]

var builderIdentities = empty(imageBuilderIdentityId) ? [] : [imageBuilderIdentityId]
module builderOperator 'modules/identity-operator.bicep' = [for id in builderIdentities: {
  name: 'dc-${environmentName}-builder-operator-${uniqueString(id)}'
  scope: resourceGroup(split(id, '/')[2], split(id, '/')[4])
  params: { principalId: identity.properties.principalId, identityName: last(split(id, '/')) }
}]

var builderGalleries = empty(imageBuilderIdentityId) ? [] : union(imageBuilderGalleries, [])
module builderGallery 'modules/image-builder-gallery.bicep' = [for g in builderGalleries: {
  name: 'dc-${environmentName}-builder-gallery-${uniqueString(g)}'
  scope: resourceGroup(split(g, '/')[2], split(g, '/')[4])
  params: { builderIdentityId: imageBuilderIdentityId, galleryName: last(split(g, '/')) }
}]

var builderNetworks = empty(imageBuilderIdentityId) ? [] : union(imageBuilderVirtualNetworks, [])
module builderNetwork 'modules/image-builder-network.bicep' = [for n in builderNetworks: {
  name: 'dc-${environmentName}-builder-network-${uniqueString(n)}'
  scope: resourceGroup(split(n, '/')[2], split(n, '/')[4])
  params: { builderIdentityId: imageBuilderIdentityId, virtualNetworkName: last(split(n, '/')) }
}]

// AKS: the cluster's user credentials (API server and CA), and Azure RBAC for Kubernetes on the
// stage's namespace.
var aksNamespaceList = union(aksNamespaces, [])
var aksClusterList = [for n in aksNamespaceList: n.cluster]
var aksClusters = union(aksClusterList, [])
module aksClusterAccess 'modules/aks-cluster-access.bicep' = [for c in aksClusters: {
  name: 'dc-${environmentName}-aks-cluster-${uniqueString(c)}'
  scope: resourceGroup(split(c, '/')[2], split(c, '/')[4])
  params: { principalId: identity.properties.principalId, clusterName: last(split(c, '/')) }
}]

module aksNamespaceAccess 'modules/aks-namespace-access.bicep' = [for n in aksNamespaceList: {
  name: 'dc-${environmentName}-aks-ns-${uniqueString(n.cluster, n.namespace)}'
  scope: resourceGroup(split(n.cluster, '/')[2], split(n.cluster, '/')[4])
  params: { principalId: identity.properties.principalId, clusterName: last(split(n.cluster, '/')), namespace: n.namespace }
}]

// Promotion between container registries: importImage on the target, read and pull on the source.
module registryAccess 'modules/registry-access.bicep' = [for r in union(containerRegistries, []): {
  name: 'dc-${environmentName}-registry-${uniqueString(r)}'
  scope: resourceGroup(split(r, '/')[2], split(r, '/')[4])
  params: { principalId: identity.properties.principalId, registryName: last(split(r, '/')) }
}]

output AZURE_FUNCTION_APP_NAME string = app.outputs.name
output DEPLOYCHAIN_PUBLIC_URL string = app.outputs.url
output SERVICE_BUS_NAMESPACE string = bus.outputs.fullyQualifiedNamespace
output KEY_VAULT_URI string = vault.outputs.uri
@description('The created scale sets\' private endpoints, for the stages\' acceptance checks: http://<host>/… (or the address).')
output SCALE_SET_ENDPOINTS array = [for (ss, i) in scaleSets: { name: ss.name, host: targetScaleSets[i].outputs.hostName, address: targetScaleSets[i].outputs.privateAddress }]
