// The network the acceptance checks need (decision 0020): one virtual network holding the function
// app's VNet integration subnet and the subnet of the scale sets this template creates, each of which
// sits behind an internal Standard load balancer. The app reaches them over private addresses (the
// stages' `checks`), by name in a private DNS zone linked to the network; nothing is exposed to the
// internet. Created only when `scaleSets` are given and no existing subnet is (`appSubnetId`).
param name string
param location string
param tags object
@description('The port the scale sets serve: the load balancers\' backend port and health probe.')
param appPort int = 8080
param addressPrefix string = '10.20.0.0/16'
@description('The function app\'s subnet: delegated to Microsoft.App/environments, as Flex Consumption VNet integration requires.')
param appSubnetPrefix string = '10.20.0.0/24'
@description('The scale sets\' subnet (their instances and internal load balancer frontends).')
param targetSubnetPrefix string = '10.20.1.0/24'
@description('The private DNS zone the scale sets\' load balancers are named in (`<scale set>.<zone>`).')
param dnsZoneName string = 'deploychain.internal'

// The scale sets accept the app port from the function app's subnet and the load balancer's probe,
// and nothing else (the default rules would admit the whole virtual network).
resource targetNsg 'Microsoft.Network/networkSecurityGroups@2023-11-01' = {
  name: 'nsg-${name}-targets'
  location: location
  tags: tags
  properties: {
    securityRules: [
      {
        name: 'app-from-load-balancer-probe'
        properties: {
          priority: 100
          direction: 'Inbound'
          access: 'Allow'
          protocol: 'Tcp'
          sourceAddressPrefix: 'AzureLoadBalancer'
          sourcePortRange: '*'
          destinationAddressPrefix: targetSubnetPrefix
          destinationPortRange: string(appPort)
        }
      }
      {
        name: 'app-from-function-app'
        properties: {
          priority: 110
          direction: 'Inbound'
          access: 'Allow'
          protocol: 'Tcp'
          sourceAddressPrefix: appSubnetPrefix
          sourcePortRange: '*'
          destinationAddressPrefix: targetSubnetPrefix
          destinationPortRange: string(appPort)
        }
      }
      {
        name: 'deny-other-inbound'
        properties: {
          priority: 4000
          direction: 'Inbound'
          access: 'Deny'
          protocol: '*'
          sourceAddressPrefix: '*'
          sourcePortRange: '*'
          destinationAddressPrefix: '*'
          destinationPortRange: '*'
        }
      }
    ]
  }
}

// The integration subnet takes no inbound traffic (the app's inbound stays its public endpoint).
resource appNsg 'Microsoft.Network/networkSecurityGroups@2023-11-01' = {
  name: 'nsg-${name}-app'
  location: location
  tags: tags
  properties: { securityRules: [] }
}

resource vnet 'Microsoft.Network/virtualNetworks@2023-11-01' = {
  name: 'vnet-${name}'
  location: location
  tags: tags
  properties: {
    addressSpace: { addressPrefixes: [addressPrefix] }
    subnets: [
      {
        name: 'app'
        properties: {
          addressPrefix: appSubnetPrefix
          networkSecurityGroup: { id: appNsg.id }
          // https://learn.microsoft.com/en-us/azure/azure-functions/flex-consumption-plan (Considerations:
          // "The subnet delegation required by Flex Consumption apps is Microsoft.App/environments"), as in
          // https://github.com/Azure-Samples/azure-functions-flex-consumption-samples/blob/main/E2E/SB-VNET/infra/core/networking/vnet.bicep
          delegations: [ { name: 'flex-consumption', properties: { serviceName: 'Microsoft.App/environments' } } ]
          // The app's outbound calls (GitHub, ARM, Service Bus, Key Vault) leave through this network:
          // keep default outbound access explicit, as new subnets are becoming private by default
          // (https://learn.microsoft.com/en-us/azure/virtual-network/ip-services/default-outbound-access).
          // A NAT gateway is the choice for a fixed outbound address.
          defaultOutboundAccess: true
        }
      }
      {
        name: 'targets'
        properties: {
          addressPrefix: targetSubnetPrefix
          networkSecurityGroup: { id: targetNsg.id }
          defaultOutboundAccess: true
        }
      }
    ]
  }
}

resource zone 'Microsoft.Network/privateDnsZones@2020-06-01' = {
  name: dnsZoneName
  location: 'global'
  tags: tags
}

resource zoneLink 'Microsoft.Network/privateDnsZones/virtualNetworkLinks@2020-06-01' = {
  parent: zone
  name: 'vnet-${name}'
  location: 'global'
  tags: tags
  properties: {
    registrationEnabled: false
    virtualNetwork: { id: vnet.id }
  }
}

output appSubnetId string = vnet.properties.subnets[0].id
output targetSubnetId string = vnet.properties.subnets[1].id
output dnsZoneName string = zone.name
