// The namespace and the chain's entities (as infra/servicebus.json declares them for the local
// bus): one topic with duplicate detection, one filtered subscription per step, the audit
// subscription, the parking queue. Keys are off: the app uses its managed identity.
param name string
param location string
param tags object
@description('The app identity: Azure Service Bus Data Sender and Data Receiver on the namespace.')
param principalId string

var topicName = 'deploychain-events'
var steps = [
  { name: 'on-push', label: 'dev.deploychain.push.v1', sessions: false }
  { name: 'on-build-completed', label: 'dev.deploychain.build.completed.v1', sessions: false }
  { name: 'on-image-due', label: 'dev.deploychain.image.due.v1', sessions: false }
  { name: 'on-image-ready', label: 'dev.deploychain.image.ready.v1', sessions: true }
  { name: 'on-deployment-due', label: 'dev.deploychain.deployment.due.v1', sessions: true }
  { name: 'on-approval', label: 'dev.deploychain.approval.decided.v1', sessions: true }
  { name: 'on-approval-due', label: 'dev.deploychain.approval.due.v1', sessions: true }
]

resource namespace 'Microsoft.ServiceBus/namespaces@2022-10-01-preview' = {
  name: name
  location: location
  tags: tags
  sku: { name: 'Standard', tier: 'Standard' }
  properties: {
    minimumTlsVersion: '1.2'
    disableLocalAuth: true
    publicNetworkAccess: 'Enabled'
  }
}

resource topic 'Microsoft.ServiceBus/namespaces/topics@2022-10-01-preview' = {
  parent: namespace
  name: topicName
  properties: {
    requiresDuplicateDetection: true
    duplicateDetectionHistoryTimeWindow: 'PT10M'
    defaultMessageTimeToLive: 'P14D'
    supportOrdering: true
  }
}

resource subscriptions 'Microsoft.ServiceBus/namespaces/topics/subscriptions@2022-10-01-preview' = [for s in steps: {
  parent: topic
  name: s.name
  properties: {
    lockDuration: 'PT1M'
    maxDeliveryCount: 10
    deadLetteringOnMessageExpiration: true
    defaultMessageTimeToLive: 'P14D'
    requiresSession: s.sessions
  }
}]

resource rules 'Microsoft.ServiceBus/namespaces/topics/subscriptions/rules@2022-10-01-preview' = [for (s, i) in steps: {
  parent: subscriptions[i]
  name: 'type'
  properties: {
    filterType: 'CorrelationFilter'
    correlationFilter: { label: s.label }
  }
}]

resource audit 'Microsoft.ServiceBus/namespaces/topics/subscriptions@2022-10-01-preview' = {
  parent: topic
  name: 'audit'
  properties: {
    lockDuration: 'PT1M'
    maxDeliveryCount: 10
    deadLetteringOnMessageExpiration: true
    defaultMessageTimeToLive: 'P14D'
  }
}

resource parked 'Microsoft.ServiceBus/namespaces/queues@2022-10-01-preview' = {
  parent: namespace
  name: 'deploychain-parked'
  properties: {
    requiresDuplicateDetection: true
    duplicateDetectionHistoryTimeWindow: 'PT10M'
    defaultMessageTimeToLive: 'P14D'
    maxDeliveryCount: 10
  }
}

// Built-in roles: Azure Service Bus Data Sender, Azure Service Bus Data Receiver.
var roles = ['69a216fc-b8fb-44d8-bc22-1f3c2cd27a39', '4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0']
resource access 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for r in roles: {
  name: guid(namespace.id, principalId, r)
  scope: namespace
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', r)
  }
}]

output fullyQualifiedNamespace string = '${namespace.name}.servicebus.windows.net'
