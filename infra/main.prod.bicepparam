using 'main.bicep'

// The production environment. Secrets come from the environment (azd env set, or the pipeline's
// secret store), never from this file.
param environmentName = 'prod'
param targetResourceGroups = ['rg-web-staging', 'rg-web-prod']
param githubWebhookSecret = readEnvironmentVariable('GITHUB_WEBHOOK_SECRET')
param approvalSigningKey = readEnvironmentVariable('APPROVAL_SIGNING_KEY')
param azureDevOpsWebhookSecret = readEnvironmentVariable('AZURE_DEVOPS_WEBHOOK_SECRET', '')
param notifyUrl = readEnvironmentVariable('DEPLOYCHAIN_NOTIFY_URL')
