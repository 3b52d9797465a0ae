//! Jenkins: `POST {jenkins}/job/{folder}/job/{name}/buildWithParameters` with the form parameters
//! `DEPLOYCHAIN_RUN`, `COMMIT` and `BRANCH`, as the user `JENKINS_USER` with the API token
//! `JENKINS_API_TOKEN` (HTTP Basic). A crumb from `GET {jenkins}/crumbIssuer/api/json` goes with it
//! when the server issues one (CSRF protection on); a 404 there means it does not. Jenkins answers
//! 201 with the queue item in `Location`.
//!
//! The job is parameterized with those three; the Notification plugin posts its build phases to
//! the `jenkins_webhook` function (`/api/hooks/jenkins`, with the function key), and the finished
//! build's `DEPLOYCHAIN_RUN` parameter names the run.

use super::{Retry, send};
use crate::adapters::{BuildRequest, BuildStarted};
use crate::config::Secret;
use crate::error::{Error, Result};
use std::time::Duration;

pub struct Jenkins {
    http: reqwest::Client,
    base: url::Url,
    user: String,
    token: Secret,
    retry: Retry,
}

impl Jenkins {
    pub fn new(base: url::Url, user: String, token: Secret, retry: Retry, timeout: Duration) -> std::result::Result<Jenkins, String> {
        Ok(Jenkins { http: super::http_client(timeout)?, base, user, token, retry })
    }

    fn url(&self, path: &str) -> url::Url {
        let mut u = self.base.clone();
        u.set_path(&format!("{}/{}", self.base.path().trim_end_matches('/'), path.trim_start_matches('/')));
        u
    }

    /// `team/web` → `job/team/job/web`.
    pub fn job_path(job: &str) -> String {
        job.split('/').filter(|s| !s.is_empty()).map(|s| format!("job/{}", super::segment(s))).collect::<Vec<_>>().join("/")
    }

    /// Queue a build of the app's job for the run.
    pub async fn build(&self, req: &BuildRequest) -> Result<BuildStarted> {
        let job = req.pipeline.as_deref().ok_or_else(|| Error::Refused(format!("app `{}` names no Jenkins job", req.app)))?;
        let secret = self.token.expose();
        let crumb_url = self.url("crumbIssuer/api/json");
        let crumb = match send(&self.retry, "Jenkins", "getting a crumb", &[secret], || {
            self.http.get(crumb_url.clone()).basic_auth(&self.user, Some(secret))
        })
        .await
        {
            Ok(a) => {
                let v = a.json();
                match (v["crumbRequestField"].as_str(), v["crumb"].as_str()) {
                    (Some(f), Some(c)) => Some((f.to_string(), c.to_string())),
                    _ => None,
                }
            }
            // No crumb issuer: CSRF protection is off (or the token is exempt).
            Err(Error::Refused(m)) if m.contains(": 404 ") => None,
            Err(e) => return Err(e),
        };
        let url = self.url(&format!("{}/buildWithParameters", Self::job_path(job)));
        let form = [("DEPLOYCHAIN_RUN", req.run_id.as_str()), ("COMMIT", req.commit.as_str()), ("BRANCH", req.branch.as_str())];
        let what = format!("queueing job `{job}`");
        let a = send(&self.retry, "Jenkins", &what, &[secret], || {
            let r = self.http.post(url.clone()).basic_auth(&self.user, Some(secret)).form(&form);
            match &crumb {
                Some((field, value)) => r.header(field.as_str(), value.as_str()),
                None => r,
            }
        })
        .await?;
        let queue = a.header("location").map(str::to_string);
        Ok(BuildStarted {
            build_id: queue.as_deref().and_then(|q| q.trim_end_matches('/').rsplit('/').next()).map(|n| format!("queue/{n}")),
            url: queue,
        })
    }
}
