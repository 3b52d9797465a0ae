// VM Image Builder, the builder's side (deployed to the resource group of a gallery the bakes
// distribute into): the identity the image templates run as creates the image version and reads the
// gallery and image definition. Exactly the actions VM Image Builder's documentation lists for
// distributing to an Azure Compute Gallery
// (https://learn.microsoft.com/en-us/azure/virtual-machines/linux/image-builder-permissions-cli#allow-vm-image-builder-to-distribute-images),
// as a custom role assignable in this resource group and assigned on the gallery only. They also
// cover a base template whose source is a version in the same gallery. The managed-image actions
// the same page lists are for `ManagedImage` distributions, which deploychain does not make.
param builderIdentityId string
@description('The gallery\'s name (in this resource group).')
param galleryName string

resource builder 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' existing = {
  scope: resourceGroup(split(builderIdentityId, '/')[2], split(builderIdentityId, '/')[4])
  name: last(split(builderIdentityId, '/'))
}

resource gallery 'Microsoft.Compute/galleries@2023-07-03' existing = {
  name: galleryName
}

resource distributeRole 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(resourceGroup().id, 'deploychain-image-builder-distribute')
  properties: {
    roleName: 'deploychain image distribution (${resourceGroup().name}, ${uniqueString(resourceGroup().id)})'
    description: 'VM Image Builder identity: read galleries and image definitions, create image versions.'
    type: 'CustomRole'
    permissions: [
      {
        actions: [
          'Microsoft.Compute/galleries/read'
          'Microsoft.Compute/galleries/images/read'
          'Microsoft.Compute/galleries/images/versions/read'
          'Microsoft.Compute/galleries/images/versions/write'
        ]
        notActions: []
        dataActions: []
        notDataActions: []
      }
    ]
    assignableScopes: [resourceGroup().id]
  }
}

resource access 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(gallery.id, builderIdentityId, distributeRole.name)
  scope: gallery
  properties: {
    principalId: builder.properties.principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', distributeRole.name)
  }
}
