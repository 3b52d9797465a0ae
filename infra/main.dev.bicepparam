using 'main.bicep'

// The development environment. Secrets come from the environment (azd env set, or the pipeline's
// secret store), never from this file.
param environmentName = 'dev'
param targetResourceGroups = ['rg-web-staging']
param githubWebhookSecret = readEnvironmentVariable('GITHUB_WEBHOOK_SECRET')
param approvalSigningKey = readEnvironmentVariable('APPROVAL_SIGNING_KEY')
param azureDevOpsWebhookSecret = readEnvironmentVariable('AZURE_DEVOPS_WEBHOOK_SECRET', '')
param notifyUrl = readEnvironmentVariable('DEPLOYCHAIN_NOTIFY_URL')
