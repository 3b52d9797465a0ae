// Azure Kubernetes Service RBAC Writer for the app identity on the one namespace an AKS stage deploys
// (deployed to the cluster's resource group; decision 0015): Azure RBAC for Kubernetes authorizes
// the Deployment patch and the ReplicaSet reads with role assignments whose scope is
// `<cluster id>/namespaces/<namespace>`
// (https://learn.microsoft.com/en-us/azure/aks/manage-azure-rbac: `az role assignment create ...
// --scope $AKS_ID/namespaces/<namespace-name>`). That scope is not an ARM resource with a Bicep
// type, so it is named as an `existing` child of the cluster (never read, only used as the scope),
// as the AKS baseline does (https://github.com/mspnp/aks-baseline/blob/main/cluster-stamp.bicep).
param principalId string
@description('The cluster\'s name (in this resource group).')
param clusterName string
@description('The namespace the stage deploys (its `kubernetes.namespace`).')
param namespace string

// Azure Kubernetes Service RBAC Writer: https://learn.microsoft.com/en-us/azure/role-based-access-control/built-in-roles/containers#azure-kubernetes-service-rbac-writer
var rbacWriter = 'a7ffa36f-339b-4b5c-8bdf-e2c188b2c0eb'

resource cluster 'Microsoft.ContainerService/managedClusters@2024-09-01' existing = {
  name: clusterName
}

resource ns 'Microsoft.ContainerService/managedClusters/namespaces@2022-01-02-preview' existing = {
  parent: cluster
  name: namespace
}

resource access 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(cluster.id, namespace, principalId, rbacWriter)
  scope: ns
  properties: {
    principalId: principalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', rbacWriter)
  }
}
