// Managed Identity Operator for the app identity on VM Image Builder's user-assigned identity
// (deployed to that identity's resource group): each run's template is created with the base
// template's identity, and assigning a user-assigned identity to a resource needs
// Microsoft.ManagedIdentity/userAssignedIdentities/*/assign/action on it (decision 0020).
param principalId string
@description('The builder identity\'s name (in this resource group).')
param identityName string

// Managed Identity Operator: https://learn.microsoft.com/en-us/azure/role-based-access-control/built-in-roles/identity#managed-identity-operator
var managedIdentityOperator = 'f1a07417-d97a-45cb-824c-7a7467783830'

resource builder 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' existing = {
  name: identityName
}

resource access 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(builder.id, principalId, managedIdentityOperator)
  scope: builder
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', managedIdentityOperator)
  }
}
