//! A stage's acceptance checks: plain HTTP GETs against the deployed app, after each upgraded batch
//! passed its health gate. They use their own HTTP client: the ARM token never goes to them.

use crate::policy::Check;
use std::time::Duration;

/// Run every check in order; the first that keeps failing after its retries is the error.
pub async fn run(http: &reqwest::Client, checks: &[Check]) -> Result<(), String> {
    for check in checks {
        run_one(http, check).await?;
    }
    Ok(())
}

async fn run_one(http: &reqwest::Client, check: &Check) -> Result<(), String> {
    let Some(url) = check.url.as_deref() else {
        return Err(format!("`{}` check without a url", check.kind));
    };
    let shown = shown_url(url);
    let attempts = check.retries.saturating_add(1);
    let mut last = String::new();
    for attempt in 1..=attempts {
        match attempt_once(http, url, check).await {
            Ok(()) => return Ok(()),
            Err(why) => last = why,
        }
        if attempt < attempts {
            tokio::time::sleep(check.interval()).await;
        }
    }
    Err(format!("acceptance check GET {shown} failed after {attempts} attempt{}: {last}", if attempts == 1 { "" } else { "s" }))
}

/// One attempt of `check` (a rollout step runs one, and schedules the next after the check's
/// interval); the error is what a final failure says, with `attempts` the attempts made in all.
pub async fn attempt(http: &reqwest::Client, check: &Check, attempts: u32) -> Result<(), String> {
    let Some(url) = check.url.as_deref() else {
        return Err(format!("`{}` check without a url", check.kind));
    };
    attempt_once(http, url, check).await.map_err(|last| {
        format!("acceptance check GET {} failed after {attempts} attempt{}: {last}", shown_url(url), if attempts == 1 { "" } else { "s" })
    })
}

async fn attempt_once(http: &reqwest::Client, url: &str, check: &Check) -> Result<(), String> {
    let resp = http.get(url).timeout(check.timeout()).send().await.map_err(|e| {
        if e.is_timeout() { format!("no answer within {}", super::client::human(check.timeout())) } else { e.without_url().to_string() }
    })?;
    let status = resp.status().as_u16();
    let body = tokio::time::timeout(check.timeout().max(Duration::from_millis(1)), resp.text())
        .await
        .map_err(|_| "the body did not arrive in time".to_string())?
        .map_err(|e| e.without_url().to_string())?;
    if status != check.expect_status {
        return Err(format!("answered {status}, expected {}", check.expect_status));
    }
    if let Some(want) = check.expect_body.as_deref()
        && !body.contains(want)
    {
        return Err(format!("answered {status} without `{want}` in the body"));
    }
    Ok(())
}

/// The URL without its query or credentials: a check URL may carry a key (`?code=…`).
fn shown_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            u.set_query(None);
            let _ = u.set_password(None);
            let _ = u.set_username("");
            u.to_string()
        }
        Err(_) => "(invalid url)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_urls_hide_keys() {
        assert_eq!(shown_url("https://u:p@app.example.com/healthz?code=secret"), "https://app.example.com/healthz");
    }
}
