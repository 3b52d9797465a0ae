// VM Image Builder, the app's side (deployed to a resource group holding base image templates): the
// app reads the app's base template there and creates, runs, reads (status, run output) and deletes
// each run's template `deploychain-{run}` (decision 0014). No built-in role is limited to image
// templates (Contributor would be the whole resource group), so a custom role with exactly those
// actions, assignable only here. The actions are the Microsoft.VirtualMachineImages operations of the
// REST API the app calls (https://learn.microsoft.com/en-us/rest/api/imagebuilder/virtual-machine-image-templates);
// see also https://learn.microsoft.com/en-us/azure/virtual-machines/linux/image-builder-permissions-cli.
// Deploying a custom role needs Microsoft.Authorization/roleDefinitions/write (Owner or User Access
// Administrator).
param principalId string

var roleName = 'deploychain image templates (${resourceGroup().name}, ${uniqueString(resourceGroup().id)})'

resource templatesRole 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(resourceGroup().id, 'deploychain-image-templates')
  properties: {
    roleName: roleName
    description: 'deploychain: create, run, read and delete VM Image Builder templates in this resource group, and read their run outputs.'
    type: 'CustomRole'
    permissions: [
      {
        actions: [
          'Microsoft.VirtualMachineImages/imageTemplates/read'
          'Microsoft.VirtualMachineImages/imageTemplates/write'
          'Microsoft.VirtualMachineImages/imageTemplates/delete'
          'Microsoft.VirtualMachineImages/imageTemplates/run/action'
          'Microsoft.VirtualMachineImages/imageTemplates/runOutputs/read'
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
  name: guid(resourceGroup().id, principalId, templatesRole.name)
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', templatesRole.name)
  }
}
