//! Image bakes: the [`ImageBaker`] the policy's `image.source` selects.
//!
//! - `image-builder`: Azure VM Image Builder through ARM. Each run gets its own image template,
//!   `deploychain-{run}`, made from the app's base template (its source, customizers, identity,
//!   VM profile) with one distribution: the gallery image version `{destination}/versions/1.0.{sequence}`
//!   tagged with the run, the commit and the build. Templates cannot be updated, and a run's
//!   template and version names are its own, so a re-bake of the same build reuses what exists — the
//!   finished version, the running bake, or the template — and never collides. The bake takes tens
//!   of minutes, longer than an invocation may: the step starts it, and `image.due` scheduled
//!   messages look at the template's `lastRunStatus` until it ends (the version from its run
//!   output) or the policy's timeout passes.
//! - `ci`: the build made the image (Packer in CI, a VM Application upload): the gallery version of
//!   the destination tagged `deploychain.commit` = the commit. None → the run fails saying so.
//! - `registry`: a registry publishes it and its webhook reports it; nothing to start.

use super::arm::{ArmClient, ArmError};
use super::{BakeStarted, BakeStatus, ImageBaker, ImageRequest};
use crate::error::{Error, Result};
use async_trait::async_trait;
use deploychain_events::{ImageKind, ImageRef};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// The VM Image Builder API version.
pub const VIB_API_VERSION: &str = "2024-02-01";
/// The Compute Gallery API version.
pub const GALLERY_API_VERSION: &str = "2023-07-03";
/// The run output every deploychain template distributes under.
pub const RUN_OUTPUT: &str = "deploychain";

fn arm_error(what: &str, e: ArmError) -> Error {
    match e {
        ArmError::Transient(m) => Error::Transient(m),
        ArmError::Throttled(m, after) => Error::Throttled(m, after),
        ArmError::PreconditionFailed(m) => Error::Transient(m),
        ArmError::NotFound(m) | ArmError::Failed(m) => Error::Refused(format!("{what}: {m}")),
    }
}

/// `…/resourceGroups/{rg}` of a resource id.
fn resource_group(id: &str) -> String {
    id.split('/').take(5).collect::<Vec<_>>().join("/")
}

pub struct VmImageBuilder {
    arm: Arc<ArmClient>,
    /// How long after starting (and between looks) to look at a bake again.
    pub look_every: Duration,
}

impl VmImageBuilder {
    pub fn new(arm: Arc<ArmClient>, look_every: Duration) -> VmImageBuilder {
        VmImageBuilder { arm, look_every }
    }

    /// The run's own template and version ids.
    pub fn names(req: &ImageRequest) -> (String, String) {
        let base = req.template.clone().unwrap_or_default();
        let template =
            format!("{}/providers/Microsoft.VirtualMachineImages/imageTemplates/deploychain-{}", resource_group(&base), req.run_id);
        let version = format!("{}/versions/1.0.{}", req.destination.trim_end_matches('/'), req.sequence.max(0));
        (template, version)
    }

    async fn get(&self, id: &str, api: &str) -> std::result::Result<Option<Value>, ArmError> {
        match self.arm.send(reqwest::Method::GET, &self.arm.url_api(id, "", api), None, None).await {
            Ok(a) => Ok(Some(a.body)),
            Err(ArmError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn image(id: &str) -> ImageRef {
        ImageRef {
            kind: ImageKind::GalleryImageVersion,
            id: id.to_string(),
            version: id.rsplit('/').next().map(str::to_string),
            digest: None,
        }
    }

    /// The template for the run, from the app's base template.
    fn template_body(base: &Value, req: &ImageRequest, version: &str) -> Value {
        let p = &base["properties"];
        let tags = json!({ "deploychain.run": req.run_id, "deploychain.commit": req.commit, "deploychain.build": req.build_id });
        let regions = p["distribute"][0]["targetRegions"].clone();
        let regions = if regions.is_array() { regions } else { json!([{ "name": base["location"], "replicaCount": 1 }]) };
        let mut props = json!({
            "source": p["source"], "customize": p["customize"], "vmProfile": p["vmProfile"],
            "distribute": [{ "type": "SharedImage", "galleryImageId": version, "runOutputName": RUN_OUTPUT,
                             "artifactTags": tags, "targetRegions": regions }],
        });
        // Not the base's `stagingResourceGroup`: a staging group that exists "must be empty"
        // (ImageTemplate.stagingResourceGroup, Microsoft.VirtualMachineImages REST reference), so
        // two runs' templates cannot share one; each run's template gets its own IT_… group.
        for k in ["buildTimeoutInMinutes", "validate", "optimize"] {
            if !p[k].is_null() {
                props[k] = p[k].clone();
            }
        }
        if props["customize"].is_null() {
            props.as_object_mut().map(|o| o.remove("customize"));
        }
        json!({ "location": base["location"], "identity": base["identity"], "tags": tags, "properties": props })
    }

    async fn start(&self, req: &ImageRequest) -> std::result::Result<BakeStarted, ArmError> {
        let (template, version) = Self::names(req);
        // A re-bake of a run whose version exists reuses it (or refuses a name another run took).
        if let Some(v) = self.get(&version, GALLERY_API_VERSION).await? {
            let owner = v["tags"]["deploychain.run"].as_str().unwrap_or_default();
            if owner == req.run_id {
                return Ok(BakeStarted::Ready(Self::image(&version)));
            }
            return Err(ArmError::Failed(format!(
                "the gallery version {version} exists already and is not this run's (its run: `{owner}`)"
            )));
        }
        let existing = self.get(&template, VIB_API_VERSION).await?;
        let state = existing.as_ref().and_then(|t| t["properties"]["lastRunStatus"]["runState"].as_str().map(str::to_string));
        if existing.is_none() {
            let base_id = req.template.clone().unwrap_or_default();
            let Some(base) = self.get(&base_id, VIB_API_VERSION).await? else {
                return Err(ArmError::Failed(format!("the image template {base_id} does not exist (the app's `image.template`)")));
            };
            let body = Self::template_body(&base, req, &version);
            let a = self.arm.send(reqwest::Method::PUT, &self.arm.url_api(&template, "", VIB_API_VERSION), None, Some(&body)).await?;
            self.arm.wait_operation("creating the image template", &a).await?;
        }
        match state.as_deref() {
            Some("Running") => {}
            Some("Succeeded" | "PartiallySucceeded") => {
                if let BakeStatus::Ready(img) = self.look(&template).await? {
                    return Ok(BakeStarted::Ready(img));
                }
            }
            _ => {
                // The run's operation lasts as long as the bake: it is not waited for here.
                self.arm.send(reqwest::Method::POST, &self.arm.url_api(&template, "/run", VIB_API_VERSION), None, None).await?;
            }
        }
        Ok(BakeStarted::Baking { bake: template, look_after: self.look_every })
    }

    async fn look(&self, template: &str) -> std::result::Result<BakeStatus, ArmError> {
        let Some(t) = self.get(template, VIB_API_VERSION).await? else {
            return Ok(BakeStatus::Failed(format!("the image template {template} is gone")));
        };
        let run = &t["properties"]["lastRunStatus"];
        let message = run["message"].as_str().filter(|m| !m.is_empty()).unwrap_or("no message");
        match run["runState"].as_str().unwrap_or_default() {
            "Succeeded" | "PartiallySucceeded" => {
                let out = self
                    .arm
                    .send(
                        reqwest::Method::GET,
                        &self.arm.url_api(template, &format!("/runOutputs/{RUN_OUTPUT}"), VIB_API_VERSION),
                        None,
                        None,
                    )
                    .await?;
                match out.body["properties"]["artifactId"].as_str() {
                    Some(id) => Ok(BakeStatus::Ready(Self::image(id))),
                    None => Ok(BakeStatus::Failed(format!("the bake succeeded but run output `{RUN_OUTPUT}` names no artifact"))),
                }
            }
            "Failed" => Ok(BakeStatus::Failed(format!("VM Image Builder: the bake failed: {message}"))),
            "Canceled" | "Canceling" => Ok(BakeStatus::Failed(format!("VM Image Builder: the bake was canceled: {message}"))),
            _ => Ok(BakeStatus::Running(run["runSubState"].as_str().unwrap_or("Building").to_string())),
        }
    }
}

/// Images the build made: the gallery version tagged with the commit.
pub struct CiBaked {
    arm: Arc<ArmClient>,
}

impl CiBaked {
    pub fn new(arm: Arc<ArmClient>) -> CiBaked {
        CiBaked { arm }
    }

    async fn find(&self, req: &ImageRequest) -> Result<BakeStarted> {
        let what = format!("finding the version of {} the build published", req.destination);
        let mut url = self.arm.url_api(&req.destination, "/versions", GALLERY_API_VERSION);
        loop {
            let a = self.arm.send(reqwest::Method::GET, &url, None, None).await.map_err(|e| arm_error(&what, e))?;
            let found = a.body["value"].as_array().into_iter().flatten().find(|v| {
                v["tags"]["deploychain.commit"].as_str().is_some_and(|c| c.eq_ignore_ascii_case(&req.commit))
                    && v["properties"]["provisioningState"].as_str().is_none_or(|s| s == "Succeeded")
            });
            if let Some(v) = found {
                let id = v["id"].as_str().unwrap_or_default();
                return Ok(BakeStarted::Ready(ImageRef {
                    kind: req.kind,
                    id: id.to_string(),
                    version: v["name"].as_str().map(str::to_string),
                    digest: None,
                }));
            }
            match a.body["nextLink"].as_str() {
                Some(next) => url = url::Url::parse(next).map_err(|e| Error::Refused(format!("{what}: bad nextLink: {e}")))?,
                None => break,
            }
        }
        Err(Error::Refused(format!(
            "no version of {} is tagged deploychain.commit={}: the build did not publish its image (tag the version it publishes)",
            req.destination, req.commit
        )))
    }
}

/// The bakers the handler has; each `None` where there is no ARM endpoint to reach.
#[derive(Default)]
pub struct Bakers {
    pub image_builder: Option<VmImageBuilder>,
    pub ci: Option<CiBaked>,
}

#[async_trait]
impl ImageBaker for Bakers {
    async fn request_image(&self, req: &ImageRequest) -> Result<BakeStarted> {
        match req.source.as_str() {
            "image-builder" => {
                let vib = self.image_builder.as_ref().ok_or_else(|| Error::Refused("VM Image Builder is not configured".into()))?;
                vib.start(req).await.map_err(|e| arm_error("VM Image Builder", e))
            }
            "ci" => self.ci.as_ref().ok_or_else(|| Error::Refused("no ARM endpoint to find CI-made images".into()))?.find(req).await,
            _ => Ok(BakeStarted::Reported),
        }
    }

    async fn check_image(&self, _req: &ImageRequest, bake: &str) -> Result<BakeStatus> {
        let vib = self.image_builder.as_ref().ok_or_else(|| Error::Refused("VM Image Builder is not configured".into()))?;
        vib.look(bake).await.map_err(|e| arm_error("VM Image Builder", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runs_template_takes_the_bases_settings_but_never_its_staging_resource_group() {
        let base = json!({
            "location": "westeurope",
            "identity": { "type": "UserAssigned", "userAssignedIdentities": { "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/aib": {} } },
            "properties": {
                "source": { "type": "PlatformImage", "publisher": "Canonical" },
                "customize": [{ "type": "Shell", "name": "app", "inline": ["echo hi"] }],
                "vmProfile": { "vmSize": "Standard_D2s_v3" },
                "buildTimeoutInMinutes": 90,
                "stagingResourceGroup": "/subscriptions/s/resourceGroups/rg-aib-staging",
                "distribute": [{ "targetRegions": [{ "name": "westeurope", "replicaCount": 2 }] }]
            }
        });
        let req = ImageRequest {
            run_id: "web-3f2a9c1d0b7e".into(),
            app: "web".into(),
            commit: "3f2a9c1d0b7e".into(),
            build_id: "42".into(),
            source: "image-builder".into(),
            destination: "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/web".into(),
            sequence: 7,
            template: None,
            kind: ImageKind::GalleryImageVersion,
        };
        let body = VmImageBuilder::template_body(&base, &req, "…/images/web/versions/1.0.7");
        let p = &body["properties"];
        assert_eq!(p["buildTimeoutInMinutes"], 90);
        // A staging group that exists must be empty: two runs could not share the base's.
        assert!(p.get("stagingResourceGroup").is_none(), "{p}");
        assert_eq!(p["distribute"][0]["targetRegions"][0]["replicaCount"], 2);
        assert_eq!(body["tags"]["deploychain.run"], "web-3f2a9c1d0b7e");
    }
}
