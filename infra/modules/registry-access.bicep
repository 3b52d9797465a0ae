// Container Registry Data Importer and Data Reader for the app identity on one registry (deployed
// to the registry's resource group; decision 0015). Promotion reads the target registry (its login
// server) and calls its ARM importImage with the source registry's resource id; Azure Container
// Registry's documentation asks for this role on the target registry (importImage) and on the
// source registry (reading and pulling what is imported):
// https://learn.microsoft.com/en-us/azure/container-registry/container-registry-import-images#import-container-images-from-an-azure-container-registry-in-the-same-microsoft-entra-tenant
// It is the narrowest built-in role with importImage (Microsoft.ContainerRegistry/registries/importImage/action,
// registries/read, registries/pull/read).
param principalId string
@description('The registry\'s name (in this resource group).')
param registryName string

// Container Registry Data Importer and Data Reader: https://learn.microsoft.com/en-us/azure/role-based-access-control/built-in-roles/containers#container-registry-data-importer-and-data-reader
var importer = '577a9874-89fd-4f24-9dbd-b5034d0ad23a'

resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' existing = {
  name: registryName
}

resource access 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(registry.id, principalId, importer)
  scope: registry
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', importer)
  }
}
