// Read access for the app identity on one Compute Gallery (deployed to the gallery's resource
// group): the rollouts' scale-set PATCH references a gallery image version or a VM Application
// version, which the caller must be able to read, and the bakes and `ci` images look versions up
// (decision 0020).
param principalId string
@description('The gallery\'s name (in this resource group).')
param galleryName string
@description('The built-in role: Compute Gallery Image Reader (image versions) or Reader (VM Application versions too).')
param roleId string

resource gallery 'Microsoft.Compute/galleries@2023-07-03' existing = {
  name: galleryName
}

resource access 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(gallery.id, principalId, roleId)
  scope: gallery
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleId)
  }
}
