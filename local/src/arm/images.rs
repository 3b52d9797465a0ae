//! Image templates (Azure VM Image Builder, `Microsoft.VirtualMachineImages/imageTemplates`) and
//! Compute Gallery versions on the local ARM endpoint: what the image bake adapters call.
//!
//! - `GET`/`PUT` an image template (a PUT of an existing template with other properties is
//!   refused, as VM Image Builder does: templates cannot be updated), `POST …/run` (202 with an
//!   `Azure-AsyncOperation`; the run takes `bake_time`), `GET …/runOutputs/{name}`.
//! - `GET` a gallery image (or application) version, and `GET …/versions` to list them with
//!   their tags.

use super::State;
use super::rest::{Answer, operation, query_param};
use super::world::{Effect, ImageTemplate, name_of};
use axum::http::{Method, Uri};
use serde_json::{Value, json};

const TEMPLATES: &str = "/providers/microsoft.virtualmachineimages/imagetemplates/";
const VIB_LOCATIONS: &str = "/providers/microsoft.virtualmachineimages/locations/";
const GALLERIES: &str = "/providers/microsoft.compute/galleries/";
const REGISTRIES: &str = "/providers/microsoft.containerregistry/registries/";
const ACR_LOCATIONS: &str = "/providers/microsoft.containerregistry/locations/";
const CLUSTERS: &str = "/providers/microsoft.containerservice/managedclusters/";

/// The VM Image Builder API versions the endpoint answers.
pub const VIB_API_VERSIONS: [&str; 3] = ["2022-07-01", "2023-07-01", "2024-02-01"];
/// The Compute Gallery API versions the endpoint answers.
pub const GALLERY_API_VERSIONS: [&str; 3] = ["2023-07-03", "2024-03-03", "2025-03-03"];

/// Whether `path` is served here.
pub fn serves(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    lower.contains(TEMPLATES)
        || lower.contains(VIB_LOCATIONS)
        || (lower.contains(GALLERIES) && lower.contains("/versions"))
        || lower.contains(REGISTRIES)
        || lower.contains(ACR_LOCATIONS)
        || lower.contains(CLUSTERS)
}

/// The container registry and AKS API versions the endpoint answers.
pub const ACR_API_VERSIONS: [&str; 2] = ["2023-07-01", "2025-04-01"];
pub const AKS_API_VERSIONS: [&str; 2] = ["2024-09-01", "2025-05-01"];

pub fn answer(s: &mut State, method: &Method, uri: &Uri, body: &Value, base: &str, now: i64, fail_with: Option<Value>) -> Answer {
    let path = uri.path();
    let lower = path.to_ascii_lowercase();
    let version = query_param(uri, "api-version").unwrap_or_default();
    let supported: &[&str] = if lower.contains(GALLERIES) {
        &GALLERY_API_VERSIONS
    } else if lower.contains(REGISTRIES) || lower.contains(ACR_LOCATIONS) {
        &ACR_API_VERSIONS
    } else if lower.contains(CLUSTERS) {
        &AKS_API_VERSIONS
    } else {
        &VIB_API_VERSIONS
    };
    if !supported.contains(&version) {
        return Answer::error(
            400,
            "InvalidApiVersionParameter",
            format!("The api-version '{version}' is invalid. The supported versions are '{}'.", supported.join(",")),
        );
    }
    if lower.contains(VIB_LOCATIONS) && lower.contains("/operations/") {
        return match *method {
            Method::GET => operation(s, name_of(path), false),
            _ => Answer::error(405, "MethodNotAllowed", format!("{method} is not allowed on an operation")),
        };
    }
    if lower.contains(GALLERIES) {
        return gallery(s, method, path);
    }
    if lower.contains(ACR_LOCATIONS) && lower.contains("/operations/") {
        return operation(s, name_of(path), true);
    }
    if lower.contains(REGISTRIES) {
        return registry(s, method, path, body, base, version, now, fail_with);
    }
    if lower.contains(CLUSTERS) {
        return cluster(s, method, path);
    }
    let Some(at) = lower.find(TEMPLATES) else { return Answer::error(404, "InvalidResourceType", path.to_string()) };
    let rest = &path[at + TEMPLATES.len()..];
    let (name, suffix) = rest.split_once('/').map(|(n, x)| (n, format!("/{}", x.to_ascii_lowercase()))).unwrap_or((rest, String::new()));
    let id = format!("{}{}", &path[..at + TEMPLATES.len()], name);
    let key = id.to_ascii_lowercase();
    let sub = id.split('/').nth(2).unwrap_or_default().to_string();
    let op_url = |s: &State, op: &str| {
        let location = s.world.templates.get(&key).and_then(|t| t.body["location"].as_str()).unwrap_or("westus").to_string();
        format!(
            "{base}/subscriptions/{sub}/providers/Microsoft.VirtualMachineImages/locations/{location}/operations/{op}?api-version={version}"
        )
    };
    let not_found = || {
        Answer::error(
            404,
            "ResourceNotFound",
            format!("The Resource 'Microsoft.VirtualMachineImages/imageTemplates/{name}' was not found."),
        )
    };
    match (method.as_str(), suffix.as_str()) {
        ("GET", "") => match s.world.templates.get(&key) {
            Some(t) => Answer::json(200, t.body.clone()),
            None => not_found(),
        },
        ("PUT", "") => {
            let props = &body["properties"];
            if !body.is_object() || !props["source"].is_object() || !props["distribute"].is_array() {
                return Answer::error(400, "InvalidParameter", "An image template needs properties.source and properties.distribute.");
            }
            if let Some(t) = s.world.templates.get(&key) {
                let same = |k: &str| t.body["properties"][k] == props[k];
                if ["source", "customize", "distribute", "vmProfile"].iter().all(|k| same(k)) {
                    return Answer::json(200, t.body.clone());
                }
                return Answer::error(
                    409,
                    "InvalidPropertyUpdate",
                    "Update/Upgrade of image templates is currently not supported. Please change the name of the template you are submitting.",
                );
            }
            let mut b = body.clone();
            b["id"] = id.clone().into();
            b["name"] = name.into();
            b["type"] = "Microsoft.VirtualMachineImages/imageTemplates".into();
            b["properties"]["provisioningState"] = "Creating".into();
            s.world.templates.insert(key.clone(), ImageTemplate { body: b.clone(), outputs: Default::default() });
            let ready = now + s.world.timing.operation_ms;
            let op = s.world.new_operation(&key, Effect::Provision, now, ready, fail_with);
            let _ = s.save();
            Answer::json(201, b).header("azure-asyncoperation", op_url(s, &op))
        }
        ("POST", "/run") => {
            let Some(t) = s.world.templates.get_mut(&key) else { return not_found() };
            if t.body["properties"]["lastRunStatus"]["runState"] == "Running" {
                return Answer::error(409, "Conflict", "The image template has a run in progress.");
            }
            t.body["properties"]["lastRunStatus"] = json!({ "runState": "Running", "runSubState": "Building", "message": "" });
            let ready = now + s.world.timing.bake_ms;
            let op = s.world.new_operation(&key, Effect::ImageRun, now, ready, fail_with);
            let _ = s.save();
            let url = op_url(s, &op);
            Answer::empty(202).header("azure-asyncoperation", url.clone()).header("location", url)
        }
        ("GET", sfx) if sfx.starts_with("/runoutputs/") => {
            let Some(t) = s.world.templates.get(&key) else { return not_found() };
            let out = &rest[rest.len() - (sfx.len() - "/runoutputs/".len())..];
            match t.outputs.get(out) {
                Some(artifact) => Answer::json(
                    200,
                    json!({ "id": format!("{id}/runOutputs/{out}"), "name": out, "type": "Microsoft.VirtualMachineImages/imageTemplates/runOutputs",
                            "properties": { "artifactId": artifact, "provisioningState": "Succeeded" } }),
                ),
                None => Answer::error(404, "ResourceNotFound", format!("The run output '{out}' of image template '{name}' was not found.")),
            }
        }
        (m, sfx) => Answer::error(
            405,
            "OperationNotSupported",
            format!("The local ARM endpoint does not serve {m} on imageTemplates/{{name}}{sfx}"),
        ),
    }
}

fn gallery(s: &State, method: &Method, path: &str) -> Answer {
    let key = path.trim_end_matches('/').to_ascii_lowercase();
    match *method {
        Method::GET if key.ends_with("/versions") => {
            let prefix = format!("{key}/");
            let value: Vec<Value> = s
                .world
                .gallery_versions
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix) && !k[prefix.len()..].contains('/'))
                .map(|(_, v)| v.clone())
                .collect();
            Answer::json(200, json!({ "value": value }))
        }
        Method::GET => match s.world.gallery_versions.get(&key) {
            Some(v) => Answer::json(200, v.clone()),
            None => Answer::error(404, "ResourceNotFound", format!("The Resource '{}' was not found.", name_of(path))),
        },
        _ => Answer::error(405, "OperationNotSupported", format!("The local ARM endpoint does not serve {method} on gallery versions")),
    }
}

#[allow(clippy::too_many_arguments)]
fn registry(
    s: &mut State,
    method: &Method,
    path: &str,
    body: &Value,
    base: &str,
    version: &str,
    now: i64,
    fail_with: Option<Value>,
) -> Answer {
    let lower = path.to_ascii_lowercase();
    let at = lower.find(REGISTRIES).unwrap_or(0) + REGISTRIES.len();
    let (name, suffix) =
        lower[at..].split_once('/').map(|(n, x)| (n.to_string(), format!("/{x}"))).unwrap_or((lower[at..].to_string(), String::new()));
    let id = &path[..at + name.len()];
    let key = id.to_ascii_lowercase();
    match (method.as_str(), suffix.as_str()) {
        ("GET", "") => Answer::json(
            200,
            json!({ "id": id, "name": name, "type": "Microsoft.ContainerRegistry/registries", "location": "westus", "sku": { "name": "Premium", "tier": "Premium" },
                    "properties": { "loginServer": format!("{name}.azurecr.io"), "provisioningState": "Succeeded", "adminUserEnabled": false } }),
        ),
        ("POST", "/importimage") => {
            let source = body["source"]["resourceId"].as_str().or(body["source"]["registryUri"].as_str());
            let image = body["source"]["sourceImage"].as_str();
            let (Some(source), Some(image)) = (source, image) else {
                return Answer::error(400, "InvalidParameter", "source.resourceId (or registryUri) and source.sourceImage are required.");
            };
            let src_key = source.to_ascii_lowercase();
            if src_key.contains(REGISTRIES) && !s.world.registry_images.get(&src_key).is_some_and(|v| v.iter().any(|i| i == image)) {
                return Answer::error(404, "ManifestUnknown", format!("The image '{image}' was not found in the source registry."));
            }
            s.world.imports.push(json!({ "registry": id, "source": source, "sourceImage": image, "mode": body["mode"] }));
            let images = s.world.registry_images.entry(key.clone()).or_default();
            if !images.iter().any(|i| i == image) {
                images.push(image.to_string());
            }
            let op = s.world.new_operation(&key, Effect::Import, now, now + s.world.timing.operation_ms, fail_with);
            let _ = s.save();
            let sub = id.split('/').nth(2).unwrap_or_default();
            let url = format!(
                "{base}/subscriptions/{sub}/providers/Microsoft.ContainerRegistry/locations/westus/operations/{op}?api-version={version}"
            );
            Answer::empty(202).header("location", url).header("retry-after", "0")
        }
        (m, sfx) => {
            Answer::error(405, "OperationNotSupported", format!("The local ARM endpoint does not serve {m} on registries/{{name}}{sfx}"))
        }
    }
}

fn cluster(s: &State, method: &Method, path: &str) -> Answer {
    let lower = path.to_ascii_lowercase();
    let at = lower.find(CLUSTERS).unwrap_or(0) + CLUSTERS.len();
    let (name, suffix) =
        lower[at..].split_once('/').map(|(n, x)| (n.to_string(), format!("/{x}"))).unwrap_or((lower[at..].to_string(), String::new()));
    let Some(server) = s.kube_server.clone() else {
        return Answer::error(
            404,
            "ResourceNotFound",
            format!("The Resource 'Microsoft.ContainerService/managedClusters/{name}' was not found."),
        );
    };
    match (method.as_str(), suffix.as_str()) {
        ("POST", "/listclusterusercredential") => {
            let user = format!("clusterUser_{name}");
            let kubeconfig = format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: {server}/{name}\ncontexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: {user}\ncurrent-context: {name}\nusers:\n- name: {user}\n  user:\n    exec:\n      apiVersion: client.authentication.k8s.io/v1beta1\n      command: kubelogin\n      args: [get-token, --server-id, 6dae42f8-4368-4678-94ff-3960e28e3630]\n"
            );
            use base64::Engine;
            Answer::json(
                200,
                json!({ "kubeconfigs": [{ "name": "clusterUser", "value": base64::engine::general_purpose::STANDARD.encode(kubeconfig) }] }),
            )
        }
        ("GET", "") => Answer::json(
            200,
            json!({ "id": &path[..at + name.len()], "name": name, "type": "Microsoft.ContainerService/ManagedClusters", "location": "westus",
                    "properties": { "provisioningState": "Succeeded", "fqdn": format!("{name}.hcp.westus.azmk8s.io"), "aadProfile": { "managed": true, "enableAzureRBAC": true } } }),
        ),
        (m, sfx) => Answer::error(
            405,
            "OperationNotSupported",
            format!("The local ARM endpoint does not serve {m} on managedClusters/{{name}}{sfx}"),
        ),
    }
}
