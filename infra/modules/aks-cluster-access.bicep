// Azure Kubernetes Service Cluster User Role for the app identity on one AKS cluster (deployed to the
// cluster's resource group): the rollouts call listClusterUserCredential for the API server and its
// CA (decision 0015). Requests to the API server itself are authorized by Azure RBAC for Kubernetes
// (aks-namespace-access.bicep).
param principalId string
@description('The cluster\'s name (in this resource group).')
param clusterName string

// Azure Kubernetes Service Cluster User Role: https://learn.microsoft.com/en-us/azure/role-based-access-control/built-in-roles/containers#azure-kubernetes-service-cluster-user-role
var clusterUser = '4abbcc35-e782-43d8-92c5-2d3f1bd2253f'

resource cluster 'Microsoft.ContainerService/managedClusters@2024-09-01' existing = {
  name: clusterName
}

resource access 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(cluster.id, principalId, clusterUser)
  scope: cluster
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', clusterUser)
  }
}
