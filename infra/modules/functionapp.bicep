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

var packageContainer = 'app-package'

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // checkov:skip=CKV_AZURE_35:The Functions host and the package deployment reach it over the public endpoint (no VNet integration here); shared keys are off, access is the app identity's RBAC.
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
      appSettings: [
        { name: 'AzureWebJobsStorage__accountName', value: storage.name }
        { name: 'AzureWebJobsStorage__credential', value: 'managedidentity' }
        { name: 'AzureWebJobsStorage__clientId', value: identityClientId }
        { name: 'ServiceBusConnection__fullyQualifiedNamespace', value: serviceBusNamespace }
        { name: 'ServiceBusConnection__credential', value: 'managedidentity' }
        { name: 'ServiceBusConnection__clientId', value: identityClientId }
        { name: 'AZURE_CLIENT_ID', value: identityClientId }
        { name: 'DEPLOYCHAIN_ARM_CREDENTIAL', value: 'managed-identity' }
        { name: 'DEPLOYCHAIN_PUBLIC_URL', value: 'https://${name}.azurewebsites.net' }
        { name: 'DEPLOYCHAIN_POLICY', value: 'policy.toml' }
        { name: 'DEPLOYCHAIN_STORE', value: 'table:${storage.properties.primaryEndpoints.table}' }
        { name: 'DEPLOYCHAIN_WATCHDOG_SCHEDULE', value: '0 */5 * * * *' }
        { name: 'APPLICATIONINSIGHTS_CONNECTION_STRING', value: '@Microsoft.KeyVault(SecretUri=${vaultUri}secrets/appinsights-connection-string)' }
        { name: 'GITHUB_WEBHOOK_SECRET', value: '@Microsoft.KeyVault(SecretUri=${vaultUri}secrets/github-webhook-secret)' }
        { name: 'AZURE_DEVOPS_WEBHOOK_SECRET', value: '@Microsoft.KeyVault(SecretUri=${vaultUri}secrets/azure-devops-webhook-secret)' }
        { name: 'APPROVAL_SIGNING_KEY', value: '@Microsoft.KeyVault(SecretUri=${vaultUri}secrets/approval-signing-key)' }
        { name: 'DEPLOYCHAIN_NOTIFY_URL', value: '@Microsoft.KeyVault(SecretUri=${vaultUri}secrets/notify-url)' }
      ]
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
