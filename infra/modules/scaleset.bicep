// An optional target: a Linux VM scale set behind a Standard load balancer, with the Application
// Health extension the rollouts gate on (HTTP `/healthz` on the app's port) and a Manual upgrade
// policy (deploychain upgrades batch by batch). Tagged with its app and stage, as the rollouts
// expect.
param name string
param location string
param tags object
@description('The image the instances start from (a Compute Gallery image version id).')
param imageId string
param instances int = 2
param vmSize string = 'Standard_D2ds_v5'
@description('The port the app serves (and the health probe checks).')
param appPort int = 8080
param adminUsername string = 'azureuser'
@description('The SSH public key of the admin user (password sign-in is off).')
param sshPublicKey string

resource nsg 'Microsoft.Network/networkSecurityGroups@2023-11-01' = {
  name: 'nsg-${name}'
  location: location
  tags: tags
  properties: {
    securityRules: [
      {
        name: 'app-from-load-balancer'
        properties: {
          priority: 100
          direction: 'Inbound'
          access: 'Allow'
          protocol: 'Tcp'
          sourceAddressPrefix: 'AzureLoadBalancer'
          sourcePortRange: '*'
          destinationAddressPrefix: '*'
          destinationPortRange: string(appPort)
        }
      }
    ]
  }
}

resource vnet 'Microsoft.Network/virtualNetworks@2023-11-01' = {
  name: 'vnet-${name}'
  location: location
  tags: tags
  properties: {
    addressSpace: { addressPrefixes: ['10.20.0.0/16'] }
    subnets: [
      { name: 'instances', properties: { addressPrefix: '10.20.1.0/24', networkSecurityGroup: { id: nsg.id } } }
    ]
  }
}

resource lb 'Microsoft.Network/loadBalancers@2023-11-01' = {
  name: 'lb-${name}'
  location: location
  tags: tags
  sku: { name: 'Standard' }
  properties: {
    frontendIPConfigurations: [
      { name: 'frontend', properties: { subnet: { id: vnet.properties.subnets[0].id }, privateIPAllocationMethod: 'Dynamic' } }
    ]
    backendAddressPools: [ { name: 'instances' } ]
    probes: [
      { name: 'healthz', properties: { protocol: 'Http', port: appPort, requestPath: '/healthz', intervalInSeconds: 5, numberOfProbes: 2 } }
    ]
    loadBalancingRules: [
      {
        name: 'app'
        properties: {
          frontendIPConfiguration: { id: resourceId('Microsoft.Network/loadBalancers/frontendIPConfigurations', 'lb-${name}', 'frontend') }
          backendAddressPool: { id: resourceId('Microsoft.Network/loadBalancers/backendAddressPools', 'lb-${name}', 'instances') }
          probe: { id: resourceId('Microsoft.Network/loadBalancers/probes', 'lb-${name}', 'healthz') }
          protocol: 'Tcp'
          frontendPort: 80
          backendPort: appPort
          idleTimeoutInMinutes: 4
        }
      }
    ]
  }
}

resource vmss 'Microsoft.Compute/virtualMachineScaleSets@2024-07-01' = {
  // checkov:skip=CKV_AZURE_95:The image is the release: deploychain rolls it out under a Manual policy, and OS patches arrive as newly baked images through the same gates; automatic OS image upgrades would change it behind the pipeline.
  name: name
  location: location
  tags: tags
  sku: { name: vmSize, tier: 'Standard', capacity: instances }
  properties: {
    orchestrationMode: 'Uniform'
    upgradePolicy: { mode: 'Manual' }
    overprovision: false
    virtualMachineProfile: {
      storageProfile: {
        imageReference: { id: imageId }
        osDisk: { createOption: 'FromImage', caching: 'ReadWrite', managedDisk: { storageAccountType: 'Premium_LRS' } }
      }
      osProfile: {
        computerNamePrefix: take(name, 9)
        adminUsername: adminUsername
        linuxConfiguration: {
          disablePasswordAuthentication: true
          ssh: { publicKeys: [ { path: '/home/${adminUsername}/.ssh/authorized_keys', keyData: sshPublicKey } ] }
        }
      }
      securityProfile: { encryptionAtHost: true }
      networkProfile: {
        networkInterfaceConfigurations: [
          {
            name: 'nic'
            properties: {
              primary: true
              ipConfigurations: [
                {
                  name: 'ip'
                  properties: {
                    subnet: { id: vnet.properties.subnets[0].id }
                    loadBalancerBackendAddressPools: [ { id: lb.properties.backendAddressPools[0].id } ]
                  }
                }
              ]
            }
          }
        ]
      }
      extensionProfile: {
        extensions: [
          {
            name: 'HealthExtension'
            properties: {
              publisher: 'Microsoft.ManagedServices'
              type: 'ApplicationHealthLinux'
              typeHandlerVersion: '2.0'
              autoUpgradeMinorVersion: true
              settings: { protocol: 'http', port: appPort, requestPath: '/healthz' }
            }
          }
        ]
      }
    }
  }
}

output id string = vmss.id
