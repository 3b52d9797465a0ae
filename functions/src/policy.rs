//! The pipeline policy: which repositories and branches start runs, how they are built and baked,
//! and the ordered stages with their targets, checks and approval rules.
//!
//! The policy is a TOML file shipped with the function app (`DEPLOYCHAIN_POLICY`), never read from
//! the repository being deployed, so a change cannot weaken its own gate (DESIGN invariant 7).
//! Loading validates everything and names the offending key, so a bad policy fails start-up.

use deploychain_events::{BuildProvider, ImageKind};
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Named groups of approvers (`[groups]`, `release-managers = ["alice@contoso.com", …]`);
    /// an approval names one as `group:release-managers`.
    #[serde(default)]
    pub groups: BTreeMap<String, Vec<String>>,
    #[serde(rename = "app", default)]
    pub apps: Vec<App>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct App {
    pub name: String,
    pub source: Source,
    /// Branch names or patterns with one trailing `*` (`release/*`).
    pub branches: Vec<String>,
    pub build: Build,
    pub image: Image,
    #[serde(rename = "stage")]
    pub stages: Vec<Stage>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// `owner/repo` of a GitHub repository.
    pub github: Option<String>,
    /// Clone URL of an Azure Repos repository (`https://dev.azure.com/org/project/_git/repo`).
    pub azure_devops: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Build {
    pub provider: BuildProvider,
    /// GitHub: workflow file name (`build.yml`) or name; matched against `workflow_run`. Azure
    /// Pipelines: pipeline (definition) name or id; matched against `build.complete`. Jenkins: the
    /// job's full name (`team/web`).
    pub pipeline: Option<String>,
    /// Who starts the build: deploychain (`dispatch`, the default: GitHub `workflow_dispatch`, the
    /// Azure Pipelines Runs API, Jenkins `buildWithParameters`) or the repository's own CI trigger
    /// on the push (`push`); either way the build's report continues the run.
    #[serde(default)]
    pub trigger: BuildTrigger,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum BuildTrigger {
    #[default]
    Dispatch,
    Push,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Image {
    pub source: ImageSource,
    /// `image-builder` and `ci`: the gallery image (or application) definition id versions land
    /// in. `registry`: the image repository (`ghcr.io/owner/name`) whose published versions are
    /// this app's images.
    pub destination: String,
    /// `image-builder`: the image template each bake is made from (its source, customizers,
    /// identity and VM profile; default: the template named after the app in the gallery's
    /// resource group).
    pub template: Option<String>,
    /// `image-builder`: how long a bake may take before the run fails (default `4h`).
    pub timeout: Option<String>,
    /// `registry` on Azure Container Registry: the registry's resource id, where promotions
    /// import from.
    pub registry: Option<String>,
}

impl Image {
    /// The image template bakes are made from.
    pub fn template_id(&self, app: &str) -> String {
        self.template.clone().unwrap_or_else(|| {
            let rg: Vec<&str> = self.destination.split('/').take(5).collect();
            format!("{}/providers/Microsoft.VirtualMachineImages/imageTemplates/{app}", rg.join("/"))
        })
    }

    /// How long a bake may take.
    pub fn bake_timeout(&self) -> Duration {
        self.timeout.as_deref().and_then(parse_duration).unwrap_or(Duration::from_secs(4 * 3600))
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ImageSource {
    /// Azure VM Image Builder bakes it from an image template into the gallery image definition.
    ImageBuilder,
    /// A container registry publishes it (reported by webhook).
    Registry,
    /// The build made it (Packer in CI, a VM Application upload): the gallery version tagged
    /// `deploychain.commit` with the build's commit.
    Ci,
}

impl ImageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageSource::ImageBuilder => "image-builder",
            ImageSource::Registry => "registry",
            ImageSource::Ci => "ci",
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    pub name: String,
    /// The VM scale set resource id this stage deploys to.
    pub target: String,
    /// What the artifact replaces on the scale set's model: its OS image (default) or a VM Application.
    #[serde(default)]
    pub deploy: DeployMode,
    /// Instances upgraded (and health-gated) at a time under a `Manual` upgrade policy.
    #[serde(default = "one")]
    pub batch_size: u32,
    #[serde(default)]
    pub checks: Vec<Check>,
    pub approval: Option<Approval>,
    /// For an AKS cluster `target`: the Deployment and container the image goes to.
    pub kubernetes: Option<KubeTarget>,
    /// An Azure Container Registry (resource id) the image is imported into, by digest, before
    /// this stage deploys it (promotion from a non-production registry).
    pub registry: Option<String>,
}

/// Where in a cluster a stage deploys.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KubeTarget {
    pub namespace: String,
    pub deployment: String,
    /// The container whose image changes (default: the pod's first).
    pub container: Option<String>,
}

impl Stage {
    /// Whether the stage deploys to an AKS cluster (else a VM scale set).
    pub fn is_kubernetes(&self) -> bool {
        self.target.to_ascii_lowercase().contains("/providers/microsoft.containerservice/managedclusters/")
    }
}

/// How a stage rolls an artifact out to its scale set.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum DeployMode {
    /// The artifact is a gallery image version: it replaces `storageProfile.imageReference`.
    #[default]
    Image,
    /// The artifact is a gallery application version: it replaces this application's entry in
    /// `applicationProfile.galleryApplications` (VM Applications), the OS image stays.
    VmApplication,
}

impl DeployMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DeployMode::Image => "image",
            DeployMode::VmApplication => "vm-application",
        }
    }

    /// The kind of artifact a stage in this mode deploys.
    pub fn artifact_kind(self) -> ImageKind {
        match self {
            DeployMode::Image => ImageKind::GalleryImageVersion,
            DeployMode::VmApplication => ImageKind::GalleryApplicationVersion,
        }
    }
}

/// An acceptance check, run after each upgraded batch passed its health gate.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Check {
    /// `http`: GET `url` must answer `expect_status` (and contain `expect_body`) before the stage
    /// counts as deployed.
    pub kind: String,
    pub url: Option<String>,
    /// The status the check expects (default 200).
    #[serde(default = "default_status")]
    pub expect_status: u16,
    /// A substring the answer's body must contain.
    pub expect_body: Option<String>,
    /// Further attempts after a failed one (default 3).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Pause between attempts (default `5s`).
    #[serde(default = "default_interval")]
    pub interval: String,
    /// Longest wait for one answer (default `10s`).
    #[serde(default = "default_check_timeout")]
    pub timeout: String,
}

impl Check {
    /// An `http` check of `url` with the defaults.
    pub fn http(url: impl Into<String>) -> Check {
        Check {
            kind: "http".into(),
            url: Some(url.into()),
            expect_status: default_status(),
            expect_body: None,
            retries: default_retries(),
            interval: default_interval(),
            timeout: default_check_timeout(),
        }
    }
    pub fn interval(&self) -> Duration {
        parse_duration(&self.interval).unwrap_or(Duration::from_secs(5))
    }
    pub fn timeout(&self) -> Duration {
        parse_duration(&self.timeout).unwrap_or(Duration::from_secs(10))
    }
}

fn default_status() -> u16 {
    200
}
fn default_retries() -> u32 {
    3
}
fn default_interval() -> String {
    "5s".into()
}
fn default_check_timeout() -> String {
    "10s".into()
}

/// Upper bound on `retries`, so a typo cannot hold a stage for hours.
pub const MAX_CHECK_RETRIES: u32 = 100;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    /// People (their identity: the e-mail they sign in with) and `group:NAME`s.
    pub approvers: Vec<String>,
    /// Distinct approvals needed. The pusher and the commit authors of the release never count:
    /// they get no link and cannot approve.
    #[serde(default = "one")]
    pub quorum: u32,
    /// How long the approval waits (`30m`, `24h`, `7d`); then `on_timeout` applies.
    #[serde(default = "default_expiry")]
    pub expires_after: String,
    /// What a timeout does: `reject` (default), `approve`, or `escalate` to `escalate_to` for another
    /// `expires_after` (after which it rejects).
    #[serde(default)]
    pub on_timeout: TimeoutAction,
    #[serde(default)]
    pub escalate_to: Vec<String>,
    /// Reminders to the approvers who have not decided, this long before the timeout (`["4h", "1h"]`).
    #[serde(default)]
    pub remind_before: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum TimeoutAction {
    #[default]
    Reject,
    Approve,
    Escalate,
}

impl TimeoutAction {
    pub fn as_str(self) -> &'static str {
        match self {
            TimeoutAction::Reject => "reject",
            TimeoutAction::Approve => "approve",
            TimeoutAction::Escalate => "escalate",
        }
    }
}

fn one() -> u32 {
    1
}
fn default_expiry() -> String {
    "24h".into()
}

impl Approval {
    pub fn expiry(&self) -> Duration {
        parse_duration(&self.expires_after).unwrap_or(Duration::from_secs(86_400))
    }

    /// When the reminders go, as durations before the timeout, longest first.
    pub fn reminders(&self) -> Vec<Duration> {
        let mut r: Vec<Duration> = self.remind_before.iter().filter_map(|d| parse_duration(d)).collect();
        r.sort_by(|a, b| b.cmp(a));
        r
    }
}

/// `250ms`, `90s`, `30m`, `24h`, `7d` (positive).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        "d" => Duration::from_secs(n.checked_mul(86_400)?),
        _ => return None,
    };
    (!d.is_zero()).then_some(d)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("policy: {0}")]
    Syntax(String),
    #[error("policy: `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> PolicyError {
    PolicyError::Invalid { key: key.into(), message: message.into() }
}

impl Policy {
    pub fn from_toml(text: &str) -> Result<Policy, PolicyError> {
        // toml's message names the key and the line; keep it as it is.
        let p: Policy = toml::from_str(text).map_err(|e| PolicyError::Syntax(e.to_string().trim_end().to_string()))?;
        p.validate()?;
        Ok(p)
    }

    fn validate(&self) -> Result<(), PolicyError> {
        if self.apps.is_empty() {
            return Err(invalid("app", "no apps: add at least one [[app]] table"));
        }
        for (name, members) in &self.groups {
            let k = format!("groups.{name}");
            if !valid_name(name) {
                return Err(invalid(k, "a group name is 1-40 of a-z, 0-9 and `-`"));
            }
            if members.is_empty() || members.iter().any(|m| m.trim().is_empty() || m.starts_with("group:")) {
                return Err(invalid(k, "list at least one person (groups do not nest)"));
            }
        }
        let mut names = HashSet::new();
        let mut repos = HashSet::new();
        for (i, app) in self.apps.iter().enumerate() {
            let k = |f: &str| format!("app[{i}].{f}");
            if !valid_name(&app.name) {
                return Err(invalid(
                    k("name"),
                    format!("`{}` must be 1-40 of a-z, 0-9 and `-`, starting with a letter or digit", app.name),
                ));
            }
            if !names.insert(app.name.clone()) {
                return Err(invalid(k("name"), format!("app `{}` is declared twice", app.name)));
            }
            match (&app.source.github, &app.source.azure_devops) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(invalid(k("source"), "set exactly one of `github` or `azure_devops`"));
                }
                (Some(gh), None) => {
                    let parts: Vec<&str> = gh.split('/').collect();
                    if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
                        return Err(invalid(k("source.github"), format!("`{gh}` is not `owner/repo`")));
                    }
                }
                (None, Some(url)) => {
                    if url::Url::parse(url).is_err() {
                        return Err(invalid(k("source.azure_devops"), format!("`{url}` is not a URL")));
                    }
                }
            }
            // Two apps may share a repository only on disjoint branches; keep it simple: one app per repo+branch pattern.
            for b in &app.branches {
                if !repos.insert((app.source_key(), b.clone())) {
                    return Err(invalid(k("branches"), format!("branch `{b}` of this repository already belongs to another app")));
                }
            }
            if app.branches.is_empty() {
                return Err(invalid(k("branches"), "list at least one branch"));
            }
            for (j, b) in app.branches.iter().enumerate() {
                if b.is_empty() || b.starts_with("refs/") || b[..b.len().saturating_sub(1)].contains('*') {
                    return Err(invalid(k(&format!("branches[{j}]")), format!("`{b}`: use a branch name, optionally ending in one `*`")));
                }
            }
            if let (BuildProvider::GithubActions, false) = (app.build.provider, app.source.github.is_some()) {
                return Err(invalid(k("build.provider"), "github-actions builds need a `source.github` repository"));
            }
            if app.build.provider == BuildProvider::Jenkins && app.build.pipeline.as_deref().is_none_or(|p| p.trim().is_empty()) {
                return Err(invalid(k("build.pipeline"), "jenkins builds need the job's full name (`team/web`)"));
            }
            if app.build.provider == BuildProvider::AzurePipelines
                && app.build.trigger == BuildTrigger::Dispatch
                && app.build.pipeline.as_deref().is_none_or(|p| p.trim().is_empty())
            {
                return Err(invalid(k("build.pipeline"), "azure-pipelines builds started by deploychain need the pipeline's name or id"));
            }
            if app.image.destination.trim().is_empty() {
                return Err(invalid(k("image.destination"), "must not be empty"));
            }
            let dest = app.image.destination.to_ascii_lowercase();
            if app.image.source == ImageSource::ImageBuilder
                && !(dest.contains("/providers/microsoft.compute/galleries/") && dest.contains("/images/"))
            {
                return Err(invalid(
                    k("image.destination"),
                    "image-builder bakes into a Compute Gallery image definition (…/galleries/{gallery}/images/{image}); a VM Application is built by CI (`source = \"ci\"`)",
                ));
            }
            if app.image.source == ImageSource::Ci && !dest.contains("/providers/microsoft.compute/galleries/") {
                return Err(invalid(k("image.destination"), "ci images land in a Compute Gallery image or application definition"));
            }
            if let Some(t) = &app.image.timeout
                && parse_duration(t).is_none()
            {
                return Err(invalid(k("image.timeout"), format!("`{t}` is not a duration like 90m or 4h")));
            }
            if let Some(t) = &app.image.template
                && !t.to_ascii_lowercase().contains("/providers/microsoft.virtualmachineimages/imagetemplates/")
            {
                return Err(invalid(
                    k("image.template"),
                    "must be an image template resource id (…/providers/Microsoft.VirtualMachineImages/imageTemplates/{name})",
                ));
            }
            if app.stages.is_empty() {
                return Err(invalid(k("stage"), "list at least one [[app.stage]]"));
            }
            let mut stage_names = HashSet::new();
            for (j, st) in app.stages.iter().enumerate() {
                let sk = |f: &str| format!("app[{i}].stage[{j}].{f}");
                if !valid_name(&st.name) {
                    return Err(invalid(sk("name"), format!("`{}` must be 1-40 of a-z, 0-9 and `-`", st.name)));
                }
                if !stage_names.insert(st.name.clone()) {
                    return Err(invalid(sk("name"), format!("stage `{}` is declared twice", st.name)));
                }
                if !st.target.to_ascii_lowercase().contains("/providers/microsoft.compute/virtualmachinescalesets/") && !st.is_kubernetes()
                {
                    return Err(invalid(
                        sk("target"),
                        "must be a VM scale set resource id (…/providers/Microsoft.Compute/virtualMachineScaleSets/NAME) or an AKS cluster's (…/providers/Microsoft.ContainerService/managedClusters/NAME)",
                    ));
                }
                if st.is_kubernetes() && st.kubernetes.is_none() {
                    return Err(invalid(sk("kubernetes"), "an AKS target needs `kubernetes = { namespace = \"…\", deployment = \"…\" }`"));
                }
                if st.is_kubernetes() && app.image.source != ImageSource::Registry {
                    return Err(invalid(sk("target"), "an AKS stage deploys container images: the app's image.source must be `registry`"));
                }
                if let Some(r) = &st.registry {
                    if !r.to_ascii_lowercase().contains("/providers/microsoft.containerregistry/registries/") {
                        return Err(invalid(
                            sk("registry"),
                            "must be a container registry resource id (…/providers/Microsoft.ContainerRegistry/registries/NAME)",
                        ));
                    }
                    if app.image.registry.is_none() {
                        return Err(invalid(
                            k("image.registry"),
                            "a stage promotes into another registry: name the registry images come from (its resource id)",
                        ));
                    }
                }
                if st.batch_size == 0 {
                    return Err(invalid(sk("batch_size"), "must be at least 1 (instances upgraded at a time)"));
                }
                for (c, check) in st.checks.iter().enumerate() {
                    let ck = |f: &str| sk(&format!("checks[{c}].{f}"));
                    if check.kind != "http" {
                        return Err(invalid(ck("kind"), format!("`{}` is not a known check (http)", check.kind)));
                    }
                    if check.url.as_deref().map(url::Url::parse).map(|r| r.is_err()).unwrap_or(true) {
                        return Err(invalid(ck("url"), "an http check needs a valid `url`"));
                    }
                    if !(100..=599).contains(&check.expect_status) {
                        return Err(invalid(ck("expect_status"), format!("{} is not an HTTP status (100-599)", check.expect_status)));
                    }
                    if check.retries > MAX_CHECK_RETRIES {
                        return Err(invalid(ck("retries"), format!("{} is more than {MAX_CHECK_RETRIES}", check.retries)));
                    }
                    for (key, value) in [("interval", &check.interval), ("timeout", &check.timeout)] {
                        if parse_duration(value).is_none() {
                            return Err(invalid(ck(key), format!("`{value}` is not a duration like 500ms, 5s or 1m")));
                        }
                    }
                }
                if let Some(a) = &st.approval {
                    if j == 0 {
                        return Err(invalid(
                            sk("approval"),
                            "the first stage deploys as soon as the image is ready; put approvals on later stages",
                        ));
                    }
                    if a.approvers.is_empty() || a.approvers.iter().any(|x| x.trim().is_empty()) {
                        return Err(invalid(sk("approval.approvers"), "list at least one approver identity"));
                    }
                    if a.approvers.iter().map(|x| x.to_ascii_lowercase()).collect::<HashSet<_>>().len() != a.approvers.len() {
                        return Err(invalid(sk("approval.approvers"), "an approver is listed twice"));
                    }
                    for (field, list) in [("approvers", &a.approvers), ("escalate_to", &a.escalate_to)] {
                        if let Some(g) = list.iter().filter_map(|x| x.strip_prefix("group:")).find(|g| !self.groups.contains_key(*g)) {
                            return Err(invalid(sk(&format!("approval.{field}")), format!("group `{g}` is not defined in [groups]")));
                        }
                    }
                    let people = self.expand(&a.approvers).len();
                    if a.quorum == 0 || a.quorum as usize > people {
                        return Err(invalid(sk("approval.quorum"), format!("must be between 1 and the number of approvers ({people})")));
                    }
                    match (a.on_timeout, self.expand(&a.escalate_to).len()) {
                        (TimeoutAction::Escalate, n) if n < a.quorum as usize => {
                            return Err(invalid(
                                sk("approval.escalate_to"),
                                format!("on_timeout = \"escalate\" needs at least quorum ({}) people to escalate to", a.quorum),
                            ));
                        }
                        (TimeoutAction::Reject | TimeoutAction::Approve, n) if n > 0 => {
                            return Err(invalid(sk("approval.escalate_to"), "only used with on_timeout = \"escalate\""));
                        }
                        _ => {}
                    }
                    if parse_duration(&a.expires_after).is_none() {
                        return Err(invalid(
                            sk("approval.expires_after"),
                            format!("`{}` is not a duration like 30m, 24h or 7d", a.expires_after),
                        ));
                    }
                    for (r, before) in a.remind_before.iter().enumerate() {
                        match parse_duration(before) {
                            Some(d) if d < a.expiry() => {}
                            _ => {
                                return Err(invalid(
                                    sk(&format!("approval.remind_before[{r}]")),
                                    format!("`{before}` must be a duration shorter than expires_after ({})", a.expires_after),
                                ));
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// People of an approver list: `group:NAME`s expanded, each person once (case-insensitive),
    /// in the order listed.
    pub fn expand(&self, list: &[String]) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for x in list {
            let people: Vec<String> = match x.strip_prefix("group:") {
                Some(g) => self.groups.get(g).cloned().unwrap_or_default(),
                None => vec![x.clone()],
            };
            for p in people {
                if !out.iter().any(|o| o.eq_ignore_ascii_case(&p)) {
                    out.push(p);
                }
            }
        }
        out
    }

    pub fn app(&self, name: &str) -> Option<&App> {
        self.apps.iter().find(|a| a.name == name)
    }

    /// The app that a GitHub push to `repo` (`owner/name`) on `branch` belongs to.
    pub fn github_app(&self, repo: &str, branch: &str) -> Option<&App> {
        self.apps.iter().find(|a| a.source.github.as_deref().is_some_and(|r| r.eq_ignore_ascii_case(repo)) && a.matches_branch(branch))
    }

    /// Whether any app builds from this GitHub repository (whatever the branch).
    pub fn knows_github_repo(&self, repo: &str) -> bool {
        self.apps.iter().any(|a| a.source.github.as_deref().is_some_and(|r| r.eq_ignore_ascii_case(repo)))
    }

    pub fn azure_devops_app(&self, remote_url: &str, branch: &str) -> Option<&App> {
        let want = normalize_url(remote_url);
        self.apps.iter().find(|a| a.source.azure_devops.as_deref().is_some_and(|u| normalize_url(u) == want) && a.matches_branch(branch))
    }

    /// The app whose registry image repository is `repo` (`ghcr.io/owner/name`, case-insensitive).
    pub fn registry_app(&self, repo: &str) -> Option<&App> {
        let want = repo.trim_end_matches('/').to_ascii_lowercase();
        self.apps
            .iter()
            .find(|a| a.image.source == ImageSource::Registry && a.image.destination.trim_end_matches('/').to_ascii_lowercase() == want)
    }
}

impl App {
    pub fn matches_branch(&self, branch: &str) -> bool {
        self.branches.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => branch.starts_with(prefix),
            None => p == branch,
        })
    }

    pub fn stage(&self, name: &str) -> Option<(usize, &Stage)> {
        self.stages.iter().enumerate().find(|(_, s)| s.name == name)
    }

    fn source_key(&self) -> String {
        match (&self.source.github, &self.source.azure_devops) {
            (Some(g), _) => format!("github:{}", g.to_ascii_lowercase()),
            (_, Some(u)) => format!("ado:{}", normalize_url(u)),
            _ => String::new(),
        }
    }

    /// The kind of artifact this app's `image.ready` events carry: a gallery application version
    /// when its first stage (the one an image is first rolled out to) deploys a VM Application, else
    /// what the image source makes. Stages check their own mode when they deploy.
    pub fn artifact_kind(&self) -> ImageKind {
        match (self.stages.first().map(|s| s.deploy), self.image.source) {
            (Some(DeployMode::VmApplication), _) => ImageKind::GalleryApplicationVersion,
            (_, ImageSource::ImageBuilder | ImageSource::Ci) => ImageKind::GalleryImageVersion,
            (_, ImageSource::Registry) => ImageKind::Container,
        }
    }

    pub fn repository(&self) -> &str {
        self.source.github.as_deref().or(self.source.azure_devops.as_deref()).unwrap_or_default()
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 40 && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') && !s.starts_with('-')
}

/// Azure Repos URLs compare without scheme, user info, trailing `/` or `.git`, case-insensitively.
fn normalize_url(u: &str) -> String {
    let s = u.trim().to_ascii_lowercase();
    let s = s.split_once("://").map(|(_, r)| r.to_string()).unwrap_or(s);
    let s = s.split_once('@').map(|(_, r)| r.to_string()).unwrap_or(s);
    s.trim_end_matches('/').trim_end_matches(".git").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const SAMPLE: &str = r#"
[[app]]
name = "web"
source = { github = "octo-org/web" }
branches = ["main", "release/*"]
build = { provider = "github-actions", pipeline = "build.yml" }
image = { source = "image-builder", destination = "/subscriptions/0/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/web" }

[[app.stage]]
name = "staging"
target = "/subscriptions/0/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/web-staging"
checks = [{ kind = "http", url = "https://web-staging.example.com/healthz" }]

[[app.stage]]
name = "production"
target = "/subscriptions/0/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/web-prod"
approval = { approvers = ["alice@example.com", "bob@example.com"], quorum = 1, expires_after = "24h" }
"#;

    #[test]
    fn sample_policy_loads_and_matches_branches() {
        let p = Policy::from_toml(SAMPLE).expect("valid");
        let app = p.github_app("Octo-Org/Web", "release/1.2").expect("app");
        assert_eq!(app.name, "web");
        assert!(p.github_app("octo-org/web", "feature/x").is_none());
        assert_eq!(app.stages[1].approval.as_ref().map(|a| a.expiry()), Some(Duration::from_secs(86_400)));
    }

    #[test]
    fn aks_stages_need_a_deployment_container_images_and_a_source_registry_to_promote_from() {
        let aks = |stage_extra: &str, image: &str| {
            format!(
                r#"
[[app]]
name = "shop"
source = {{ github = "o/shop" }}
branches = ["main"]
build = {{ provider = "github-actions", pipeline = "build.yml" }}
image = {image}
[[app.stage]]
name = "staging"
target = "/subscriptions/0/resourceGroups/rg/providers/Microsoft.ContainerService/managedClusters/aks"
{stage_extra}
"#
            )
        };
        let reg = r#"{ source = "registry", destination = "dev.azurecr.io/shop" }"#;
        let ok = aks(r#"kubernetes = { namespace = "shop", deployment = "shop" }"#, reg);
        let p = Policy::from_toml(&ok).expect("valid");
        assert!(p.apps[0].stages[0].is_kubernetes());
        let err = |t: &str| Policy::from_toml(t).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err(&aks("", reg)).contains("app[0].stage[0].kubernetes"));
        let gallery = r#"{ source = "image-builder", destination = "/subscriptions/0/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/shop" }"#;
        assert!(err(&aks(r#"kubernetes = { namespace = "shop", deployment = "shop" }"#, gallery)).contains("container images"));
        let promote = r#"kubernetes = { namespace = "shop", deployment = "shop" }
registry = "/subscriptions/0/resourceGroups/rg/providers/Microsoft.ContainerRegistry/registries/prod""#;
        assert!(err(&aks(promote, reg)).contains("app[0].image.registry"));
        let bad_registry = r#"kubernetes = { namespace = "shop", deployment = "shop" }
registry = "prod.azurecr.io""#;
        assert!(err(&aks(bad_registry, reg)).contains("app[0].stage[0].registry"));
    }

    #[test]
    fn errors_name_the_key() {
        let bad = SAMPLE.replace("quorum = 1", "quorum = 3");
        let err = Policy::from_toml(&bad).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("app[0].stage[1].approval.quorum"), "{err}");

        let bad = SAMPLE.replace("provider = \"github-actions\"", "provider = \"bamboo\"");
        let err = Policy::from_toml(&bad).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("provider") && err.contains("bamboo"), "{err}");

        let bad = SAMPLE.replace("checks = [", "chekcs = [");
        let err = Policy::from_toml(&bad).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("chekcs"), "{err}");

        let bad = SAMPLE.replace("virtualMachineScaleSets/web-prod", "sites/web-prod");
        let err = Policy::from_toml(&bad).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("app[0].stage[1].target"), "{err}");
    }

    #[test]
    fn stages_choose_deploy_mode_batches_and_full_checks() {
        let p = Policy::from_toml(SAMPLE).expect("valid");
        let staging = &p.apps[0].stages[0];
        assert_eq!(p.apps[0].artifact_kind(), ImageKind::GalleryImageVersion);
        assert_eq!((staging.deploy, staging.batch_size), (DeployMode::Image, 1));
        assert_eq!(staging.checks, vec![Check::http("https://web-staging.example.com/healthz")]);
        assert_eq!((staging.checks[0].interval(), staging.checks[0].timeout()), (Duration::from_secs(5), Duration::from_secs(10)));

        let agent = SAMPLE.replace(
            "checks = [{ kind = \"http\", url = \"https://web-staging.example.com/healthz\" }]",
            "deploy = \"vm-application\"\nbatch_size = 2\nchecks = [{ kind = \"http\", url = \"https://web-staging.example.com/healthz\", \
             expect_status = 204, expect_body = \"ok\", retries = 0, interval = \"250ms\", timeout = \"2s\" }]",
        );
        let p = Policy::from_toml(&agent).expect("valid");
        assert_eq!(p.apps[0].artifact_kind(), ImageKind::GalleryApplicationVersion);
        let (staging, production) = (&p.apps[0].stages[0], &p.apps[0].stages[1]);
        assert_eq!((staging.deploy, staging.batch_size), (DeployMode::VmApplication, 2));
        assert_eq!(staging.deploy.artifact_kind(), ImageKind::GalleryApplicationVersion);
        assert_eq!(production.deploy, DeployMode::Image, "modes are per stage");
        let c = &staging.checks[0];
        assert_eq!((c.expect_status, c.expect_body.as_deref(), c.retries), (204, Some("ok"), 0));
        assert_eq!((c.interval(), c.timeout()), (Duration::from_millis(250), Duration::from_secs(2)));
    }

    #[test]
    fn bad_stage_rollout_settings_name_the_key() {
        let with = |extra: &str| {
            let text = SAMPLE.replace("checks = [{ kind = \"http\", url = \"https://web-staging.example.com/healthz\" }]", extra);
            Policy::from_toml(&text).err().map(|e| e.to_string()).unwrap_or_default()
        };
        let err = with("batch_size = 0");
        assert!(err.contains("app[0].stage[0].batch_size"), "{err}");
        let err = with("deploy = \"container\"");
        assert!(err.contains("deploy") && err.contains("container"), "{err}");
        let err = with("checks = [{ kind = \"http\", url = \"https://x.example.com/\", expect_status = 42 }]");
        assert!(err.contains("app[0].stage[0].checks[0].expect_status"), "{err}");
        let err = with("checks = [{ kind = \"http\", url = \"https://x.example.com/\", interval = \"often\" }]");
        assert!(err.contains("app[0].stage[0].checks[0].interval"), "{err}");
        let err = with("checks = [{ kind = \"http\", url = \"https://x.example.com/\", timeout = \"0s\" }]");
        assert!(err.contains("app[0].stage[0].checks[0].timeout"), "{err}");
        let err = with("checks = [{ kind = \"http\", url = \"https://x.example.com/\", retries = 1000 }]");
        assert!(err.contains("app[0].stage[0].checks[0].retries"), "{err}");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("50ms"), Some(Duration::from_millis(50)));
        assert_eq!(parse_duration("0ms"), None);
        assert_eq!(parse_duration("30m"), Some(Duration::from_secs(1800)));
        assert_eq!(parse_duration("7d"), Some(Duration::from_secs(604_800)));
        assert_eq!(parse_duration("0h"), None);
        assert_eq!(parse_duration("h"), None);
        assert_eq!(parse_duration("5y"), None);
    }
}
