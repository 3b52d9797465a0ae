// Log Analytics and a workspace-based Application Insights (the handler's spans and metrics, and
// the Functions host's own telemetry).
param name string
param location string
param tags object

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: 'log-${name}'
  location: location
  tags: tags
  properties: {
    sku: { name: 'PerGB2018' }
    retentionInDays: 90
  }
}

resource insights 'Microsoft.Insights/components@2020-02-02' = {
  name: 'appi-${name}'
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: workspace.id
    // The handler's exporter sends with the instrumentation key (Entra ingestion needs a collector).
    DisableLocalAuth: false
  }
}

output connectionString string = insights.properties.ConnectionString
output workspaceId string = workspace.id
