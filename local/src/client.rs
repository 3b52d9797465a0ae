//! The client side of the `deploychain` command: signed webhooks, runs, approvals.

use crate::secrets::Secrets;
use anyhow::{Context, Result, anyhow, bail};
use hmac::{Hmac, Mac};
use serde_json::json;
use std::path::Path;

/// The one HTTP client of the CLI and the stack (one TLS set-up, pooled connections).
pub fn http() -> reqwest::Client {
    static HTTP: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    HTTP.get_or_init(|| deploychain_functions::outbound::builder().build().unwrap_or_else(|_| reqwest::Client::new())).clone()
}

pub fn github_signature(secret: &str, body: &[u8]) -> String {
    let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap_or_else(|_| unreachable!("any key length"));
    m.update(body);
    format!("sha256={}", hex::encode(m.finalize().into_bytes()))
}

/// A GitHub `push` payload for a new commit on the first GitHub app (and branch) of the policy.
pub fn sample_push(policy: &Path, branch: Option<&str>, commit_prefix: Option<&str>) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(policy).with_context(|| format!("reading {}", policy.display()))?;
    let p = deploychain_functions::policy::Policy::from_toml(&text).map_err(|e| anyhow!("{e}"))?;
    let app = p.apps.iter().find(|a| a.source.github.is_some()).ok_or_else(|| anyhow!("the policy has no GitHub app"))?;
    let repo = app.source.github.clone().unwrap_or_default();
    let branch = branch
        .map(str::to_string)
        .unwrap_or_else(|| app.branches.iter().find(|b| !b.ends_with('*')).cloned().unwrap_or_else(|| "main".into()));
    let prefix = commit_prefix.unwrap_or_default().to_ascii_lowercase();
    if prefix.len() > 40 || !prefix.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("--commit `{prefix}` is not a hex commit prefix (at most 40 of 0-9a-f)");
    }
    let random = format!("{}{}", uuid::Uuid::new_v4().simple(), &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let commit = format!("{prefix}{}", &random[prefix.len()..]);
    let before = format!("{}{}", uuid::Uuid::new_v4().simple(), &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let who = std::env::var("USER").unwrap_or_else(|_| "developer".into());
    let now = chrono::Utc::now().to_rfc3339();
    let (owner, name) = repo.split_once('/').unwrap_or(("owner", "repo"));
    Ok(serde_json::to_vec(&json!({
        "ref": format!("refs/heads/{branch}"), "before": before, "after": commit,
        "created": false, "deleted": false, "forced": false, "base_ref": null,
        "compare": format!("https://github.com/{repo}/compare/{}...{}", &before[..12], &commit[..12]),
        "commits": [{ "id": commit, "tree_id": before, "distinct": true, "message": "A change, pushed with deploychain send",
                      "timestamp": now, "url": format!("https://github.com/{repo}/commit/{commit}"),
                      "author": { "name": who, "email": format!("{who}@example.com"), "username": who },
                      "committer": { "name": who, "email": format!("{who}@example.com"), "username": who },
                      "added": [], "removed": [], "modified": ["README.md"] }],
        "head_commit": { "id": commit, "tree_id": before, "distinct": true, "message": "A change, pushed with deploychain send",
                         "timestamp": now, "url": format!("https://github.com/{repo}/commit/{commit}"),
                         "author": { "name": who, "email": format!("{who}@example.com"), "username": who },
                         "committer": { "name": who, "email": format!("{who}@example.com"), "username": who },
                         "added": [], "removed": [], "modified": ["README.md"] },
        "repository": { "name": name, "full_name": repo, "owner": { "name": owner, "login": owner }, "default_branch": branch, "private": true },
        "pusher": { "name": who, "email": format!("{who}@example.com") },
        "sender": { "login": who, "type": "User" }
    }))?)
}

pub async fn send_github(base: &str, s: &Secrets, event: &str, body: &[u8]) -> Result<(u16, String)> {
    let rsp = http()
        .post(format!("{base}/api/hooks/github"))
        .header("content-type", "application/json")
        .header("user-agent", "GitHub-Hookshot/deploychain-send")
        .header("x-github-event", event)
        .header("x-github-delivery", uuid::Uuid::new_v4().to_string())
        .header("x-hub-signature-256", github_signature(&s.github_webhook, body))
        .body(body.to_vec())
        .send()
        .await
        .with_context(|| format!("POST {base}/api/hooks/github (is `deploychain up` running?)"))?;
    Ok((rsp.status().as_u16(), rsp.text().await.unwrap_or_default()))
}

pub async fn send_azure_devops(base: &str, s: &Secrets, body: &[u8]) -> Result<(u16, String)> {
    let rsp = http()
        .post(format!("{base}/api/hooks/azure-devops"))
        .header("content-type", "application/json; charset=utf-8")
        .basic_auth(&s.azure_devops_user, Some(&s.azure_devops_webhook))
        .body(body.to_vec())
        .send()
        .await
        .with_context(|| format!("POST {base}/api/hooks/azure-devops (is `deploychain up` running?)"))?;
    Ok((rsp.status().as_u16(), rsp.text().await.unwrap_or_default()))
}

pub async fn runs(base: &str, s: &Secrets, id: Option<&str>, commit: Option<&str>) -> Result<String> {
    let mut url = url::Url::parse(&format!("{base}/api/runs"))?;
    if let Some(id) = id {
        url.path_segments_mut().map_err(|_| anyhow!("bad url"))?.push(id);
    }
    if let Some(c) = commit {
        url.query_pairs_mut().append_pair("commit", c);
    }
    let rsp = http().get(url).header("x-functions-key", &s.function_key).send().await.context("is `deploychain up` running?")?;
    let status = rsp.status().as_u16();
    let text = rsp.text().await.unwrap_or_default();
    let pretty = serde_json::from_str::<serde_json::Value>(&text).ok().and_then(|v| serde_json::to_string_pretty(&v).ok()).unwrap_or(text);
    if !(200..300).contains(&status) {
        return Err(anyhow!("{status}: {pretty}"));
    }
    Ok(pretty)
}

/// `deploychain runs`: one line per run — its id, status, and what it waits for.
pub fn describe_runs(v: &serde_json::Value) -> String {
    let mut out = String::new();
    let runs = v["runs"].as_array().cloned().unwrap_or_default();
    if runs.is_empty() {
        return "no runs yet\n".into();
    }
    for r in runs {
        let what =
            r["waiting"]["text"].as_str().map(str::to_string).unwrap_or_else(|| format!("stage {}", r["stage"].as_str().unwrap_or("-")));
        out.push_str(&format!("{:<24} {:<11} {what}\n", r["id"].as_str().unwrap_or("?"), r["status"].as_str().unwrap_or("?")));
    }
    out
}

/// `deploychain runs show ID`: the run, its wait explained, and every step on a timeline.
pub fn describe_run(r: &serde_json::Value) -> String {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    let mut out = format!(
        "run {}  {}\n  {} {} at {}\n",
        s(&r["id"]),
        s(&r["status"]).to_uppercase(),
        s(&r["repository"]),
        s(&r["branch"]),
        s(&r["commit"])
    );
    if let Some(img) = r["image"].as_str() {
        out.push_str(&format!("  image {img}\n"));
    }
    if let Some(t) = r["waiting"]["text"].as_str() {
        out.push_str(&format!("  {t}\n"));
    }
    out.push('\n');
    for step in r["steps"].as_array().cloned().unwrap_or_default() {
        let at = step["at"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&chrono::Local).format("%H:%M:%S").to_string());
        out.push_str(&format!("  {}  {}", at.unwrap_or_else(|| "--:--:--".into()), s(&step["what"])));
        if let Some(d) = step["detail"].as_str() {
            out.push_str(&format!("  ({d})"));
        }
        out.push('\n');
    }
    out
}

/// Decide from a signed approval link as the page does: read the page (its CSRF value), then
/// POST the decision with it. A page that offers no decision (decided, superseded, expired) is
/// answered with its status and text.
pub async fn decide(link: &str, decision: &str, comment: Option<&str>) -> Result<(u16, String)> {
    let http = http();
    let page = http.get(link).header("accept", "application/json").send().await.context("is `deploychain up` running?")?;
    let status = page.status().as_u16();
    let text = page.text().await.unwrap_or_default();
    if status != 200 {
        return Ok((status, text));
    }
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let Some(csrf) = v["csrf"].as_str() else {
        let why = v["closed"].as_str().map(str::to_string).unwrap_or_else(|| format!("state {}", v["state"]));
        return Ok((409, format!("this link decides nothing now: {why}")));
    };
    let rsp = http
        .post(link)
        .header("accept", "application/json")
        .json(&json!({ "decision": decision, "comment": comment, "csrf": csrf }))
        .send()
        .await
        .context("is `deploychain up` running?")?;
    Ok((rsp.status().as_u16(), rsp.text().await.unwrap_or_default()))
}

/// What each VM scale set of the policy runs, read from the local ARM endpoint through the same
/// REST operations the handler uses: one line per scale set, one per instance.
pub async fn scale_sets(arm: &str, s: &Secrets, policy: &Path) -> Result<String> {
    let text = std::fs::read_to_string(policy).with_context(|| format!("reading {}", policy.display()))?;
    let p = deploychain_functions::policy::Policy::from_toml(&text).map_err(|e| anyhow!("{e}"))?;
    let http = http();
    let get = |path: String| {
        let http = http.clone();
        let token = s.arm_token.clone();
        async move {
            let rsp = http
                .get(format!("{arm}{path}"))
                .query(&[("api-version", deploychain_functions::adapters::arm::client::API_VERSION)])
                .bearer_auth(token)
                .send()
                .await
                .with_context(|| format!("GET {arm}{path} (is `deploychain up` running?)"))?;
            let status = rsp.status().as_u16();
            let v: serde_json::Value = rsp.json().await.unwrap_or_default();
            if status != 200 {
                bail!("GET {path}: {status} {}", v["error"]["message"].as_str().unwrap_or_default());
            }
            Ok::<_, anyhow::Error>(v)
        }
    };
    let mut out = String::new();
    for app in &p.apps {
        for stage in &app.stages {
            let name = stage.target.rsplit('/').next().unwrap_or_default();
            let ss = match get(stage.target.clone()).await {
                Ok(v) => v,
                Err(e) => {
                    out.push_str(&format!("{name:<16} ({}/{}) {e:#}\n", app.name, stage.name));
                    continue;
                }
            };
            let tag = |t: &str| ss["tags"][t].as_str().unwrap_or("-").to_string();
            let profile = &ss["properties"]["virtualMachineProfile"];
            let apps: Vec<&str> = profile["applicationProfile"]["galleryApplications"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a["packageReferenceId"].as_str())
                .collect();
            out.push_str(&format!(
                "{name:<16} ({}/{})  upgrade policy {}  run {} (sequence {})\n  image        {}\n",
                app.name,
                stage.name,
                ss["properties"]["upgradePolicy"]["mode"].as_str().unwrap_or("Manual"),
                tag("deploychain.run"),
                tag("deploychain.sequence"),
                profile["storageProfile"]["imageReference"]["id"].as_str().unwrap_or("-"),
            ));
            for a in apps {
                out.push_str(&format!("  application  {a}\n"));
            }
            if let Some(r) = ss["tags"]["deploychain.rolledback"].as_str() {
                out.push_str(&format!("  rolled back  run {r}\n"));
            }
            let vms = get(format!("{}/virtualMachines", stage.target)).await?;
            for vm in vms["value"].as_array().into_iter().flatten() {
                let id = vm["instanceId"].as_str().unwrap_or_default();
                let view = get(format!("{}/virtualMachines/{id}/instanceView", stage.target)).await?;
                out.push_str(&format!(
                    "  instance {id:<3} {}  {}\n",
                    if vm["properties"]["latestModelApplied"] == true { "on the latest model " } else { "behind the model    " },
                    view["vmHealth"]["status"]["code"].as_str().unwrap_or("no health state"),
                ));
            }
        }
    }
    Ok(out)
}
