// Virtual Machine Contributor for the app identity on one target resource group: the rollouts read,
// PATCH and upgrade the scale sets there (decision 0007).
param principalId string

// Virtual Machine Contributor: https://learn.microsoft.com/en-us/azure/role-based-access-control/built-in-roles/compute#virtual-machine-contributor
var vmContributor = '9980e02c-c2be-4d73-94e8-173b1dc7cf3c'
resource access 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(resourceGroup().id, principalId, vmContributor)
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', vmContributor)
  }
}
