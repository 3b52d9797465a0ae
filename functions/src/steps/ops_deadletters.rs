//! `ops_deadletters` — HTTP `/api/ops/deadletters[/{id}]`, `authLevel: admin` (the host's master
//! key): the dead-letter operations of [`crate::ops`] for operators.
//!
//! - GET lists what is set aside (`?type=&run=&reason=&olderThan=1h&entity=`), or shows one message
//!   (`/{messageId}`); nothing changes.
//! - POST `{"action":"replay"|"purge", "ids":[…] | filters | "all":true, "dryRun":bool,
//!   "rate":n, "confirm":true}` replays or purges; a purge needs `confirm` (or `dryRun`).
//! - With App Service Authentication on, the signed-in principal needs the `deploychain.ops` app
//!   role; it is who the audit events name. Refusals change nothing: no key → 401 (host), no role
//!   → 403, bad request → 400.

use super::*;
use crate::invoke::{HttpRequest, HttpResponse};
use crate::ops::Filter;
use base64::Engine;
use serde_json::{Value, json};

pub const NAME: &str = "ops_deadletters";
/// The app role an operator's principal needs.
pub const OPS_ROLE: &str = "deploychain.ops";

/// Who is asking: the principal (with the ops role) when App Service Authentication is on, else
/// the holder of the admin key.
fn operator(state: &AppState, req: &HttpRequest) -> Result<String> {
    let raw = req.header("x-ms-client-principal");
    let Some(raw) = raw else {
        if state.config.require_signed_in {
            return Err(Error::Forbidden("App Service Authentication is on, but no signed-in principal came with the request".into()));
        }
        return Ok("admin key".into());
    };
    let p: Value = base64::engine::general_purpose::STANDARD
        .decode(raw.trim())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| Error::Unauthorized("X-MS-CLIENT-PRINCIPAL is not base64 JSON".into()))?;
    let claims = p["claims"].as_array().cloned().unwrap_or_default();
    let of = |want: &[&str]| -> Vec<String> {
        claims
            .iter()
            .filter(|c| {
                c["typ"]
                    .as_str()
                    .is_some_and(|t| want.iter().any(|w| t.eq_ignore_ascii_case(w) || t.to_ascii_lowercase().ends_with(&format!("/{w}"))))
            })
            .filter_map(|c| c["val"].as_str().map(str::to_string))
            .collect()
    };
    let name = of(&["preferred_username", "upn", "emailaddress", "name"])
        .into_iter()
        .next()
        .or_else(|| req.header("x-ms-client-principal-name").map(str::to_string));
    let who = name.unwrap_or_else(|| "a signed-in principal".into());
    if !of(&["roles", "role"]).iter().any(|r| r == OPS_ROLE) {
        return Err(Error::Forbidden(format!("{who} lacks the `{OPS_ROLE}` app role")));
    }
    Ok(who)
}

fn filter(v: &Value, ids: Vec<String>) -> Result<Filter> {
    let s = |k: &str| v[k].as_str().map(str::to_string).filter(|x| !x.is_empty());
    let older_than = match s("olderThan") {
        None => None,
        Some(d) => Some(
            crate::policy::parse_duration(&d)
                .ok_or_else(|| Error::Malformed(format!("olderThan `{d}` is not a duration like 10m or 2h")))?,
        ),
    };
    Ok(Filter { ids, event_type: s("type"), run: s("run"), reason: s("reason"), entity: s("entity"), older_than })
}

pub async fn handle(state: AppState, req: HttpRequest) -> Result<HttpResponse> {
    let who = operator(&state, &req)?;
    let ops = state
        .dead_letters
        .clone()
        .ok_or_else(|| Error::Transient("no Service Bus namespace is configured for dead-letter operations".into()))?;
    let id = req.params.get("id").filter(|i| !i.is_empty()).cloned();
    match req.method.as_str() {
        "GET" => {
            let q: Value = json!(req.query);
            let f = filter(&q, id.clone().into_iter().collect())?;
            let letters = ops.list(&f).await?;
            if id.is_some() {
                let l = letters
                    .into_iter()
                    .next()
                    .ok_or_else(|| Error::NotFound(format!("no dead-lettered or parked message `{}`", id.unwrap_or_default())))?;
                return Ok(HttpResponse::json(200, &json!(l)));
            }
            Ok(HttpResponse::json(200, &json!({ "letters": letters })))
        }
        "POST" => {
            let v: Value = serde_json::from_slice(&req.body).map_err(|e| Error::Malformed(format!("the body is not JSON: {e}")))?;
            let ids: Vec<String> = match &v["ids"] {
                Value::Null => Vec::new(),
                Value::Array(a) => a
                    .iter()
                    .map(|i| i.as_str().map(str::to_string).ok_or_else(|| Error::Malformed("ids must be strings".into())))
                    .collect::<Result<_>>()?,
                _ => return Err(Error::Malformed("ids must be a list of MessageIds".into())),
            };
            let f = filter(&v, ids)?;
            let all = v["all"].as_bool().unwrap_or(false);
            if !all
                && f.ids.is_empty()
                && f.event_type.is_none()
                && f.run.is_none()
                && f.reason.is_none()
                && f.older_than.is_none()
                && f.entity.is_none()
            {
                return Err(Error::Malformed("say which: ids, a filter (type, run, reason, olderThan, entity) or \"all\": true".into()));
            }
            let dry = v["dryRun"].as_bool().unwrap_or(false);
            let rate = v["rate"].as_f64().unwrap_or(10.0);
            if !(0.0..=1000.0).contains(&rate) {
                return Err(Error::Malformed(format!("rate {rate} is not 0 to 1000 messages a second")));
            }
            let handled = match v["action"].as_str() {
                Some("replay") => ops.replay(&f, dry, rate, &who).await?,
                Some("purge") if dry || v["confirm"].as_bool() == Some(true) => ops.purge(&f, dry, &who).await?,
                Some("purge") => {
                    return Err(Error::Malformed("a purge removes messages for good: send \"confirm\": true (or \"dryRun\": true)".into()));
                }
                other => return Err(Error::Malformed(format!("action {} is not \"replay\" or \"purge\"", other.unwrap_or("(none)")))),
            };
            Ok(HttpResponse::json(200, &json!({ "handled": handled, "dryRun": dry, "by": who })))
        }
        m => Err(Error::Malformed(format!("{m} is not supported; use GET to list and POST to replay or purge"))),
    }
}
