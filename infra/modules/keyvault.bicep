// Key Vault for the app's secrets (RBAC, soft delete and purge protection on); the app reads
// them as Key Vault references through its identity (Key Vault Secrets User).
param name string
param location string
param tags object
param principalId string
@secure()
param secrets object

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  // checkov:skip=CKV_AZURE_109:The app resolves Key Vault references over the public endpoint (the optional VNet integration reaches the scale sets' private load balancers, decision 0020, not the vault); access is RBAC-only, to the app identity.
  // checkov:skip=CKV_AZURE_189:Same: a private endpoint (with its private DNS zone) for the vault is an option this template leaves to the platform team.
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: { family: 'A', name: 'standard' }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
    publicNetworkAccess: 'Enabled'
    networkAcls: { bypass: 'AzureServices', defaultAction: 'Allow' }
  }
}

resource values 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = [for s in items(secrets): {
  // checkov:skip=CKV_AZURE_41:An expired reference would stop the app; keys rotate by APPROVAL_SIGNING_KEYS_PREVIOUS and new secret versions, not by expiry.
  parent: vault
  name: s.key
  properties: {
    value: s.value
    contentType: 'text/plain'
    attributes: { enabled: true }
  }
}]

// Key Vault Secrets User.
resource access 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, principalId, '4633458b-17de-408a-b874-0445c86b69e6')
  scope: vault
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '4633458b-17de-408a-b874-0445c86b69e6')
  }
}

output uri string = vault.properties.vaultUri
