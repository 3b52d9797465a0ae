// VM Image Builder, the builder's side (deployed to the resource group of a virtual network a base
// template builds in, `vmProfile.vnetConfig`): the builder identity reads the network and joins its
// subnet. The actions VM Image Builder's documentation lists for an existing virtual network
// (https://learn.microsoft.com/en-us/azure/virtual-machines/linux/image-builder-permissions-cli#permission-to-customize-images-on-your-virtual-networks),
// as a custom role assigned on that virtual network only.
param builderIdentityId string
@description('The virtual network\'s name (in this resource group).')
param virtualNetworkName string

resource builder 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' existing = {
  scope: resourceGroup(split(builderIdentityId, '/')[2], split(builderIdentityId, '/')[4])
  name: last(split(builderIdentityId, '/'))
}

resource network 'Microsoft.Network/virtualNetworks@2023-11-01' existing = {
  name: virtualNetworkName
}

resource joinRole 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(resourceGroup().id, 'deploychain-image-builder-network')
  properties: {
    roleName: 'deploychain image builder network (${resourceGroup().name}, ${uniqueString(resourceGroup().id)})'
    description: 'VM Image Builder identity: read a virtual network and join its subnets.'
    type: 'CustomRole'
    permissions: [
      {
        actions: [
          'Microsoft.Network/virtualNetworks/read'
          'Microsoft.Network/virtualNetworks/subnets/join/action'
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
  name: guid(network.id, builderIdentityId, joinRole.name)
  scope: network
  properties: {
    principalId: builder.properties.principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', joinRole.name)
  }
}
