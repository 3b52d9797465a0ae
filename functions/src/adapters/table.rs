//! The production store: Azure Table Storage of the function app's storage account (Azurite
//! locally and in tests), with the same semantics as the SQLite store. One table, `deploychain`:
//!
//! | entity | PartitionKey | RowKey |
//! |---|---|---|
//! | a run (its document) | run id | `run` |
//! | a committed step (outbox, published) | run id | `step|{key}` |
//! | an app's run sequence | `seq|{app}` | `seq` |
//! | an approval (its document) | `approval|{id}` | `approval` |
//! | an open approval, indexed by stage | `open|{app}|{stage}` | approval id |
//! | what layout the table holds | `meta` | `layout` |
//! | a stage's unrecovered failure | `stage|{app}|{stage}` | `failure` |
//!
//! A step's commit is one entity-group transaction on the run's partition — the step inserted,
//! the run replaced on the ETag it was read with — so it lands whole or not at all, and a second
//! commit of the same step fails on the step's insert and changes nothing. Sequences and
//! approvals change with ETag conditions (read, change, write `If-Match`; a 412 reads again).
//! The open-approval index is a hint, the approval's document decides: a row is written before
//! its approval, removed after the approval closes, and one found closed is removed when read.
//! Auth: the account key (SharedKeyLite; Azurite) or an Entra bearer (managed identity).

use super::*;
use crate::adapters::arm::TokenSource;
use crate::config::Secret;
use crate::error::Error;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use std::sync::Arc;

const TABLE: &str = "deploychain";
const VERSION: &str = "2019-02-02";
/// The table's layout: 2 added the open-approval index.
const LAYOUT: i64 = 2;

pub enum TableAuth {
    Key { account: String, key: Secret },
    Entra(Arc<dyn TokenSource>),
}

pub struct TableStore {
    http: reqwest::Client,
    table: String,
    /// `https://{account}.table.core.windows.net` or `http://127.0.0.1:10002/devstoreaccount1`.
    endpoint: url::Url,
    auth: TableAuth,
}

fn db(e: impl std::fmt::Display) -> Error {
    Error::Transient(format!("table store: {e}"))
}

/// `'x'` with quotes doubled, percent-encoded for a key in an entity's address.
fn key(s: &str) -> String {
    percent_encoding::utf8_percent_encode(&s.replace('\'', "''"), percent_encoding::NON_ALPHANUMERIC).to_string()
}

struct Answer {
    status: u16,
    etag: Option<String>,
    body: Value,
    text: String,
}

impl TableStore {
    pub fn new(endpoint: url::Url, auth: TableAuth) -> std::result::Result<TableStore, String> {
        let http =
            crate::outbound::builder().timeout(std::time::Duration::from_secs(30)).build().map_err(|e| format!("table client: {e}"))?;
        Ok(TableStore { http, table: TABLE.into(), endpoint, auth })
    }

    /// The same store in another table (tests keep one per store).
    pub fn with_table(mut self, table: &str) -> TableStore {
        self.table = table.to_string();
        self
    }

    /// Create the table if it is not there, and bring a table written by an older build up to
    /// this layout (idempotent).
    pub async fn ensure_table(&self) -> Result<()> {
        let a = self.send(reqwest::Method::POST, "Tables", None, Some(&json!({ "TableName": self.table })), None).await?;
        if !matches!(a.status, 201 | 204 | 409) {
            return Err(db(format!("creating the table: {} {}", a.status, a.text)));
        }
        let layout = self.get("meta", "layout").await?.and_then(|(v, _)| v["version"].as_i64()).unwrap_or(1);
        if layout < LAYOUT {
            // Layout 2 added the open-approval index: index the approvals still open.
            for v in self.query("kind eq 'approval'").await? {
                let a: ApprovalRecord = serde_json::from_str(v["doc"].as_str().unwrap_or_default()).map_err(db)?;
                if a.why_closed().is_none() {
                    self.index_open(&a).await?;
                }
            }
            let a = self
                .send(
                    reqwest::Method::PUT,
                    &self.entity_path("meta", "layout"),
                    None,
                    Some(&json!({ "PartitionKey": "meta", "RowKey": "layout", "version": LAYOUT })),
                    None,
                )
                .await?;
            if !matches!(a.status, 201 | 204) {
                return Err(db(format!("recording the table layout: {} {}", a.status, a.text)));
            }
        }
        Ok(())
    }

    fn open_partition(app: &str, stage: &str) -> String {
        format!("open|{app}|{stage}")
    }

    /// Put `a` in its stage's open-approval index (already there: fine).
    async fn index_open(&self, a: &ApprovalRecord) -> Result<()> {
        self.write(&Self::open_partition(&a.app, &a.stage), &a.id, json!({ "kind": "open-approval" }), None).await.map(|_| ())
    }

    fn url(&self, path: &str) -> url::Url {
        let mut u = self.endpoint.clone();
        let base = self.endpoint.path().trim_end_matches('/');
        let (p, q) = path.split_once('?').unwrap_or((path, ""));
        u.set_path(&format!("{base}/{p}"));
        u.set_query(if q.is_empty() { None } else { Some(q) });
        u
    }

    async fn authorize(&self, req: reqwest::RequestBuilder, url: &url::Url, date: &str) -> Result<reqwest::RequestBuilder> {
        Ok(match &self.auth {
            TableAuth::Key { account, key } => {
                // SharedKeyLite for the Table service: date, then the canonicalized resource.
                let resource = format!("/{account}{}", url.path());
                let resource = match url.query_pairs().find(|(k, _)| k == "comp") {
                    Some((_, v)) => format!("{resource}?comp={v}"),
                    None => resource,
                };
                let k = base64::engine::general_purpose::STANDARD.decode(key.expose()).map_err(|_| db("the account key is not base64"))?;
                let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&k).map_err(db)?;
                mac.update(format!("{date}\n{resource}").as_bytes());
                let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
                req.header("Authorization", format!("SharedKeyLite {account}:{sig}"))
            }
            TableAuth::Entra(t) => req.bearer_auth(t.token("https://storage.azure.com/.default").await?),
        })
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        if_match: Option<&str>,
        body: Option<&Value>,
        raw: Option<(String, String)>,
    ) -> Result<Answer> {
        let url = self.url(path);
        let date = chrono::Utc::now().format("%a, %d %b %Y %H:%M:%S GMT").to_string();
        let mut req = self
            .http
            .request(method, url.clone())
            .header("x-ms-date", &date)
            .header("x-ms-version", VERSION)
            .header("Accept", "application/json;odata=nometadata")
            .header("DataServiceVersion", "3.0;NetFx")
            .header("MaxDataServiceVersion", "3.0;NetFx");
        if let Some(m) = if_match {
            req = req.header("If-Match", m);
        }
        if let Some(b) = body {
            req = req.header("Content-Type", "application/json").header("Prefer", "return-no-content").body(b.to_string());
        }
        if let Some((ct, b)) = raw {
            req = req.header("Content-Type", ct).body(b);
        }
        let req = self.authorize(req, &url, &date).await?;
        let rsp = req.send().await.map_err(|e| db(e.without_url()))?;
        let status = rsp.status().as_u16();
        let etag = rsp.headers().get("etag").and_then(|v| v.to_str().ok()).map(str::to_string);
        let text = rsp.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status >= 500 || status == 429 || status == 403 {
            return Err(db(format!("{status} {}", text.chars().take(300).collect::<String>())));
        }
        Ok(Answer { status, etag, body, text })
    }

    fn entity_path(&self, pk: &str, rk: &str) -> String {
        format!("{}(PartitionKey='{}',RowKey='{}')", self.table, key(pk), key(rk))
    }

    async fn get(&self, pk: &str, rk: &str) -> Result<Option<(Value, String)>> {
        let a = self.send(reqwest::Method::GET, &self.entity_path(pk, rk), None, None, None).await?;
        match a.status {
            200 => Ok(Some((a.body, a.etag.unwrap_or_else(|| "*".into())))),
            404 => Ok(None),
            s => Err(db(format!("reading {pk}/{rk}: {s} {}", a.text))),
        }
    }

    /// Insert (`etag` None) or replace on `etag`; `Ok(false)` on a conflict (exists / changed).
    async fn write(&self, pk: &str, rk: &str, props: Value, etag: Option<&str>) -> Result<bool> {
        let mut e = props;
        e["PartitionKey"] = pk.into();
        e["RowKey"] = rk.into();
        let a = match etag {
            None => self.send(reqwest::Method::POST, &self.table, None, Some(&e), None).await?,
            Some(t) => self.send(reqwest::Method::PUT, &self.entity_path(pk, rk), Some(t), Some(&e), None).await?,
        };
        match a.status {
            201 | 204 => Ok(true),
            409 | 412 => Ok(false),
            s => Err(db(format!("writing {pk}/{rk}: {s} {}", a.text))),
        }
    }

    async fn delete(&self, pk: &str, rk: &str) -> Result<()> {
        let a = self.send(reqwest::Method::DELETE, &self.entity_path(pk, rk), Some("*"), None, None).await?;
        match a.status {
            204 | 404 => Ok(()),
            s => Err(db(format!("deleting {pk}/{rk}: {s} {}", a.text))),
        }
    }

    /// Every entity the OData `filter` selects (following continuation tokens).
    async fn query(&self, filter: &str) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        let mut next: Option<(String, String)> = None;
        loop {
            let mut q = format!("$filter={}", percent_encoding::utf8_percent_encode(filter, percent_encoding::NON_ALPHANUMERIC));
            if let Some((p, r)) = &next {
                q.push_str(&format!("&NextPartitionKey={}&NextRowKey={}", key(p), key(r)));
            }
            let url = format!("{}()?{q}", self.table);
            let date = chrono::Utc::now().format("%a, %d %b %Y %H:%M:%S GMT").to_string();
            let full = self.url(&url);
            let req = self
                .http
                .get(full.clone())
                .header("x-ms-date", &date)
                .header("x-ms-version", VERSION)
                .header("Accept", "application/json;odata=nometadata")
                .header("DataServiceVersion", "3.0;NetFx");
            let rsp = self.authorize(req, &full, &date).await?.send().await.map_err(|e| db(e.without_url()))?;
            let status = rsp.status().as_u16();
            let np = rsp.headers().get("x-ms-continuation-nextpartitionkey").and_then(|v| v.to_str().ok()).map(str::to_string);
            let nr = rsp.headers().get("x-ms-continuation-nextrowkey").and_then(|v| v.to_str().ok()).map(str::to_string);
            let text = rsp.text().await.unwrap_or_default();
            if status != 200 {
                return Err(db(format!("query: {status} {text}")));
            }
            let v: Value = serde_json::from_str(&text).map_err(db)?;
            out.extend(v["value"].as_array().cloned().unwrap_or_default());
            match (np, nr) {
                (Some(p), Some(r)) => next = Some((p, r)),
                _ => return Ok(out),
            }
        }
    }

    /// One entity-group transaction: inserts (`None`) and replaces on an ETag, all in `pk`.
    /// `Ok(false)` when any of them conflicts (nothing is applied).
    async fn transaction(&self, ops: Vec<(String, Value, Option<String>)>) -> Result<bool> {
        let batch = format!("batch_{}", uuid::Uuid::new_v4().simple());
        let changeset = format!("changeset_{}", uuid::Uuid::new_v4().simple());
        let mut body = format!("--{batch}\r\nContent-Type: multipart/mixed; boundary={changeset}\r\n\r\n");
        for (path, entity, etag) in &ops {
            let (method, target) = match etag {
                None => ("POST", self.url(&self.table)),
                Some(_) => ("PUT", self.url(path)),
            };
            body.push_str(&format!(
                "--{changeset}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n{method} {target} HTTP/1.1\r\nContent-Type: application/json\r\nAccept: application/json;odata=nometadata\r\nPrefer: return-no-content\r\nDataServiceVersion: 3.0;\r\n{}\r\n{}\r\n",
                etag.as_ref().map(|t| format!("If-Match: {t}\r\n")).unwrap_or_default(),
                entity
            ));
        }
        body.push_str(&format!("--{changeset}--\r\n--{batch}--\r\n"));
        let a = self.send(reqwest::Method::POST, "$batch", None, None, Some((format!("multipart/mixed; boundary={batch}"), body))).await?;
        if a.status != 202 {
            return Err(db(format!("transaction: {} {}", a.status, a.text)));
        }
        // Every inner answer must be a 2xx; a failed one is the only answer (with its index).
        let statuses: Vec<u16> =
            a.text.lines().filter_map(|l| l.strip_prefix("HTTP/1.1 ")).filter_map(|l| l.split_whitespace().next()?.parse().ok()).collect();
        if statuses.iter().any(|s| *s == 409 || *s == 412) {
            return Ok(false);
        }
        if let Some(s) = statuses.iter().find(|s| !(200..300).contains(*s)) {
            return Err(db(format!("transaction: an operation answered {s}: {}", a.text.chars().take(400).collect::<String>())));
        }
        Ok(true)
    }

    async fn next_sequence(&self, app: &str) -> Result<i64> {
        let pk = format!("seq|{app}");
        for _ in 0..20 {
            let (last, etag) = match self.get(&pk, "seq").await? {
                Some((v, etag)) => (v["last"].as_i64().unwrap_or(0), Some(etag)),
                None => (0, None),
            };
            if self.write(&pk, "seq", json!({ "last": last + 1 }), etag.as_deref()).await? {
                return Ok(last + 1);
            }
        }
        Err(db(format!("the sequence of `{app}` kept changing")))
    }

    fn run_entity(run: &Run) -> Result<Value> {
        Ok(json!({ "doc": serde_json::to_string(run).map_err(db)?, "app": run.app, "commit": run.commit,
                   "created": run.created_at.to_rfc3339(), "sequence": run.sequence, "kind": "run" }))
    }

    fn parse_run(v: &Value) -> Result<Run> {
        serde_json::from_str(v["doc"].as_str().unwrap_or_default()).map_err(db)
    }

    async fn modify_approval<T>(&self, id: &str, f: impl Fn(&mut ApprovalRecord) -> (bool, T)) -> Result<(ApprovalRecord, T)> {
        let pk = format!("approval|{id}");
        for _ in 0..20 {
            let Some((v, etag)) = self.get(&pk, "approval").await? else {
                return Err(Error::NotFound(format!("approval `{id}`")));
            };
            let mut a: ApprovalRecord = serde_json::from_str(v["doc"].as_str().unwrap_or_default()).map_err(db)?;
            let (changed, out) = f(&mut a);
            if !changed {
                return Ok((a, out));
            }
            let e = json!({ "doc": serde_json::to_string(&a).map_err(db)?, "app": a.app, "stage": a.stage, "kind": "approval" });
            if self.write(&pk, "approval", e, Some(&etag)).await? {
                if a.why_closed().is_some() {
                    // The index is a hint: a row left behind is removed when next read.
                    if let Err(e) = self.delete(&Self::open_partition(&a.app, &a.stage), &a.id).await {
                        tracing::warn!(approval = a.id, "could not drop a closed approval from the open index: {e}");
                    }
                }
                return Ok((a, out));
            }
        }
        Err(db(format!("approval `{id}` kept changing")))
    }
}

#[async_trait]
impl Store for TableStore {
    async fn commit_step(&self, c: &StepCommit) -> Result<bool> {
        let step_rk = format!("step|{}", c.key);
        for _ in 0..10 {
            if self.get(&c.run_id, &step_rk).await?.is_some() {
                return Ok(false);
            }
            let (mut run, etag) = match self.get(&c.run_id, "run").await? {
                Some((v, etag)) => (Self::parse_run(&v)?, Some(etag)),
                None => {
                    let Some(new_run) = &c.new_run else { return Err(Error::NotFound(format!("run `{}`", c.run_id))) };
                    let mut r = new_run.clone();
                    r.sequence = self.next_sequence(&r.app).await?;
                    (r, None)
                }
            };
            super::memory::apply(&mut run, c);
            let step = json!({ "PartitionKey": c.run_id, "RowKey": step_rk, "outbox": serde_json::to_string(&c.outbox).map_err(db)?, "published": false, "kind": "step" });
            let mut run_e = Self::run_entity(&run)?;
            run_e["PartitionKey"] = c.run_id.clone().into();
            run_e["RowKey"] = "run".into();
            let ops = vec![(String::new(), step, None), (self.entity_path(&c.run_id, "run"), run_e, etag.clone())];
            if self.transaction(ops).await? {
                match &c.stage_health {
                    Some(StageHealth::Failed(f)) => {
                        let pk = format!("stage|{}|{}", f.app, f.stage);
                        let _ = self.write(&pk, "failure", json!({ "doc": serde_json::to_string(f).map_err(db)? }), None).await?;
                    }
                    Some(StageHealth::Recovered { app, stage }) => self.delete(&format!("stage|{app}|{stage}"), "failure").await?,
                    None => {}
                }
                return Ok(true);
            }
            // A conflict: the step landed meanwhile (then false above), or the run changed (retry).
        }
        Err(db(format!("run `{}` kept changing while step `{}` was committed", c.run_id, c.key)))
    }

    async fn step(&self, run_id: &str, key: &str) -> Result<Option<StepRecord>> {
        Ok(match self.get(run_id, &format!("step|{key}")).await? {
            Some((v, _)) => Some(StepRecord {
                outbox: serde_json::from_str(v["outbox"].as_str().unwrap_or("[]")).map_err(db)?,
                published: v["published"].as_bool().unwrap_or(false),
            }),
            None => None,
        })
    }

    async fn mark_published(&self, run_id: &str, key: &str) -> Result<()> {
        let rk = format!("step|{key}");
        if let Some((mut v, etag)) = self.get(run_id, &rk).await? {
            v["published"] = true.into();
            self.write(run_id, &rk, v, Some(&etag)).await?;
        }
        Ok(())
    }

    async fn set_traceparent(&self, run_id: &str, traceparent: &str) -> Result<()> {
        for _ in 0..10 {
            let Some((v, etag)) = self.get(run_id, "run").await? else { return Ok(()) };
            let mut run = Self::parse_run(&v)?;
            run.traceparent = Some(traceparent.to_string());
            if self.write(run_id, "run", Self::run_entity(&run)?, Some(&etag)).await? {
                return Ok(());
            }
        }
        Err(db(format!("run `{run_id}` kept changing")))
    }

    async fn run(&self, id: &str) -> Result<Option<Run>> {
        self.get(id, "run").await?.map(|(v, _)| Self::parse_run(&v)).transpose()
    }

    async fn runs(&self, q: &RunQuery) -> Result<Vec<Run>> {
        let mut filter = "RowKey eq 'run'".to_string();
        if let Some(app) = &q.app {
            filter.push_str(&format!(" and app eq '{}'", app.replace('\'', "''")));
        }
        let mut v: Vec<Run> = self.query(&filter).await?.iter().map(Self::parse_run).collect::<Result<_>>()?;
        if let Some(c) = &q.commit {
            let c = c.to_ascii_lowercase();
            v.retain(|r| r.commit.starts_with(&c));
        }
        v.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.sequence.cmp(&a.sequence)));
        v.truncate(if q.limit == 0 { 50 } else { q.limit });
        Ok(v)
    }

    async fn put_approval(&self, a: &ApprovalRecord) -> Result<bool> {
        if a.why_closed().is_none() {
            self.index_open(a).await?;
        }
        let e = json!({ "doc": serde_json::to_string(a).map_err(db)?, "app": a.app, "stage": a.stage, "kind": "approval" });
        self.write(&format!("approval|{}", a.id), "approval", e, None).await
    }

    async fn approval(&self, id: &str) -> Result<Option<ApprovalRecord>> {
        self.get(&format!("approval|{id}"), "approval")
            .await?
            .map(|(v, _)| serde_json::from_str(v["doc"].as_str().unwrap_or_default()).map_err(db))
            .transpose()
    }

    async fn vote(&self, id: &str, vote: &Vote) -> Result<(ApprovalRecord, VoteResult)> {
        self.modify_approval(id, |a| {
            let r = a.apply_vote(vote);
            (matches!(r, VoteResult::Recorded), r)
        })
        .await
    }

    async fn update_approval(&self, id: &str, u: &ApprovalUpdate) -> Result<(ApprovalRecord, bool)> {
        self.modify_approval(id, |a| {
            let changed = a.apply_update(u);
            (changed, changed)
        })
        .await
    }

    async fn open_approvals(&self, app: &str, stage: &str) -> Result<Vec<ApprovalRecord>> {
        let partition = Self::open_partition(app, stage);
        let rows = self.query(&format!("PartitionKey eq '{}'", partition.replace('\'', "''"))).await?;
        let mut open = Vec::new();
        for row in rows {
            let Some(id) = row["RowKey"].as_str() else { continue };
            match self.approval(id).await? {
                Some(a) if a.why_closed().is_none() && a.app == app && a.stage == stage => open.push(a),
                Some(_) => self.delete(&partition, id).await?,
                // Not written yet (its put writes the index row first) or its put failed and
                // will be retried: leave the row.
                None => {}
            }
        }
        Ok(open)
    }

    async fn stage_failure(&self, app: &str, stage: &str) -> Result<Option<StageFailure>> {
        self.get(&format!("stage|{app}|{stage}"), "failure")
            .await?
            .map(|(v, _)| serde_json::from_str(v["doc"].as_str().unwrap_or_default()).map_err(db))
            .transpose()
    }
}
