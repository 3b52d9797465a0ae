// An optional target: a Linux VM scale set behind an internal Standard load balancer in the given
// subnet (decision 0020: the function app reaches it through its VNet integration, for the stages'
// acceptance checks), with the Application Health extension the rollouts gate on (HTTP `/healthz` on
// the app's port) and a Manual upgrade policy (deploychain upgrades batch by batch). Tagged with its
// app and stage, as the rollouts expect.
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
@description('The subnet of the instances and of the load balancer\'s private frontend (its network security group admits the app port from the function app\'s subnet and the load balancer probe).')
param subnetId string
@description('Encryption at host for the instances\' disks and caches. Needs the subscription feature Microsoft.Compute/EncryptionAtHost registered (az feature register --namespace Microsoft.Compute --name EncryptionAtHost); set false where it cannot be.')
param encryptionAtHost bool = true
@description('A private DNS zone (linked to the network) to name the load balancer in, `<name>.<zone>`; empty: none.')
param dnsZoneName string = ''

resource lb 'Microsoft.Network/loadBalancers@2023-11-01' = {
  name: 'lb-${name}'
  location: location
  tags: tags
  sku: { name: 'Standard' }
  properties: {
    frontendIPConfigurations: [
      { name: 'frontend', properties: { subnet: { id: subnetId }, privateIPAllocationMethod: 'Dynamic' } }
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
      securityProfile: { encryptionAtHost: encryptionAtHost }
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
                    subnet: { id: subnetId }
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

// Only named when dnsZoneName is given (`none` keeps the unused record's name well-formed).
resource zone 'Microsoft.Network/privateDnsZones@2020-06-01' existing = {
  name: empty(dnsZoneName) ? 'none' : dnsZoneName
}

resource record 'Microsoft.Network/privateDnsZones/A@2020-06-01' = if (!empty(dnsZoneName)) {
  parent: zone
  name: name
  properties: {
    ttl: 300
    aRecords: [ { ipv4Address: lb.properties.frontendIPConfigurations[0].properties.privateIPAddress } ]
  }
}

output id string = vmss.id
@description('The load balancer\'s private address: acceptance checks use http://<address>/… (or the DNS name).')
output privateAddress string = lb.properties.frontendIPConfigurations[0].properties.privateIPAddress
output hostName string = empty(dnsZoneName) ? '' : '${name}.${dnsZoneName}'
