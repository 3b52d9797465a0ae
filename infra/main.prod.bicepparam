using 'main.bicep'

// The production environment. Secrets come from the environment (azd env set, or the pipeline's
// secret store), never from this file.
param environmentName = 'prod'
param targetResourceGroups = ['rg-web-staging', 'rg-web-prod']
param githubWebhookSecret = readEnvironmentVariable('GITHUB_WEBHOOK_SECRET', '')
param approvalSigningKey = readEnvironmentVariable('APPROVAL_SIGNING_KEY')
param azureDevOpsWebhookSecret = readEnvironmentVariable('AZURE_DEVOPS_WEBHOOK_SECRET', '')
param notifyUrl = readEnvironmentVariable('DEPLOYCHAIN_NOTIFY_URL', '')
param notifyTeamsUrl = readEnvironmentVariable('DEPLOYCHAIN_NOTIFY_TEAMS_URL', '')
param notifySlackUrl = readEnvironmentVariable('DEPLOYCHAIN_NOTIFY_SLACK_URL', '')
param githubToken = readEnvironmentVariable('DEPLOYCHAIN_GITHUB_TOKEN', '')
param githubAppPrivateKey = readEnvironmentVariable('GITHUB_APP_PRIVATE_KEY', '')
param jenkinsApiToken = readEnvironmentVariable('JENKINS_API_TOKEN', '')

// The roles of the features policy.toml uses (decision 0020; the README's "Deploy to Azure" lists
// them). Empty, nothing is assigned. For the shipped policy.toml (an image-builder app deploying to
// scale sets), with the real ids (the app reads the galleries in imageBuilderGalleries too; list
// other galleries the rollouts deploy from in `galleries`):
// param imageBuilderIdentityId = '/subscriptions/<sub>/resourceGroups/rg-images/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id-image-builder'
// param imageTemplateResourceGroups = ['/subscriptions/<sub>/resourceGroups/rg-images']
// param imageBuilderGalleries = ['/subscriptions/<sub>/resourceGroups/rg-images/providers/Microsoft.Compute/galleries/deploychain']
// AKS stages and registry promotion (README "Containers on AKS"):
// param aksNamespaces = [{ cluster: '/subscriptions/<sub>/resourceGroups/rg-aks/providers/Microsoft.ContainerService/managedClusters/aks-prod', namespace: 'shop' }]
// param containerRegistries = ['/subscriptions/<sub>/resourceGroups/rg-acr/providers/Microsoft.ContainerRegistry/registries/contosodev', '/subscriptions/<sub>/resourceGroups/rg-acr/providers/Microsoft.ContainerRegistry/registries/contosoprod']
