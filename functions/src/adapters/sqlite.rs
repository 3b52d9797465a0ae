//! The embedded durable store: one SQLite file (WAL mode). A step's commit — its entries, the run's
//! new state and its outbox — is one transaction, so a crash leaves either all of it or none.
//! Production uses Table Storage behind the same trait; the step tests run against both.

use super::memory::apply;
use super::*;
use crate::error::Error;
use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;
use std::sync::{Arc, Mutex};

pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS runs (
  id TEXT PRIMARY KEY,
  app TEXT NOT NULL,
  commit_sha TEXT NOT NULL,
  sequence INTEGER NOT NULL,
  created_at TEXT NOT NULL,
  doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_commit ON runs(commit_sha);
CREATE INDEX IF NOT EXISTS runs_by_app ON runs(app, sequence);
CREATE INDEX IF NOT EXISTS runs_recent ON runs(created_at, sequence);
CREATE INDEX IF NOT EXISTS runs_recent_by_app ON runs(app, created_at, sequence);
CREATE TABLE IF NOT EXISTS steps (
  run_id TEXT NOT NULL,
  key TEXT NOT NULL,
  outbox TEXT NOT NULL,
  published INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (run_id, key)
);
CREATE TABLE IF NOT EXISTS approvals (
  id TEXT PRIMARY KEY,
  doc TEXT NOT NULL,
  app TEXT NOT NULL DEFAULT '',
  stage TEXT NOT NULL DEFAULT '',
  open INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS sequences (
  app TEXT PRIMARY KEY,
  last INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS stage_failures (
  app TEXT NOT NULL,
  stage TEXT NOT NULL,
  doc TEXT NOT NULL,
  PRIMARY KEY (app, stage)
);
";

/// After [`SCHEMA`] (and [`add_approval_columns`] on a file written before them): the open
/// approvals of a stage are an index range, not a scan of every approval ever asked.
const INDEXES: &str = "CREATE INDEX IF NOT EXISTS approvals_open ON approvals(app, stage) WHERE open = 1;";

/// A file from before approvals carried `app`, `stage` and `open`: add them, filled from the
/// documents.
fn add_approval_columns(conn: &mut Connection) -> rusqlite::Result<()> {
    let has_open: bool = conn.query_row("SELECT COUNT(*) FROM pragma_table_info('approvals') WHERE name = 'open'", [], |r| r.get(0))?;
    if has_open {
        return Ok(());
    }
    let tx = conn.transaction()?;
    tx.execute_batch(
        "ALTER TABLE approvals ADD COLUMN app TEXT NOT NULL DEFAULT '';
         ALTER TABLE approvals ADD COLUMN stage TEXT NOT NULL DEFAULT '';
         ALTER TABLE approvals ADD COLUMN open INTEGER NOT NULL DEFAULT 0;",
    )?;
    let docs: Vec<(String, String)> =
        tx.prepare("SELECT id, doc FROM approvals")?.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?;
    for (id, doc) in docs {
        // A document this build cannot read stays out of the index (and `open` = 0), as it would
        // have failed the old scan.
        if let Ok(a) = serde_json::from_str::<ApprovalRecord>(&doc) {
            tx.execute(
                "UPDATE approvals SET app = ?2, stage = ?3, open = ?4 WHERE id = ?1",
                params![id, a.app, a.stage, a.why_closed().is_none()],
            )?;
        }
    }
    tx.commit()
}

fn db_err(e: impl std::fmt::Display) -> Error {
    Error::Transient(format!("state store: {e}"))
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(db_err)
}

fn from_json<T: serde::de::DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(db_err)
}

impl SqliteStore {
    pub fn open(path: &Path) -> std::result::Result<SqliteStore, String> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let conn = Connection::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        Self::init(conn)
    }

    pub fn in_memory() -> std::result::Result<SqliteStore, String> {
        Self::init(Connection::open_in_memory().map_err(|e| e.to_string())?)
    }

    fn init(mut conn: Connection) -> std::result::Result<SqliteStore, String> {
        conn.pragma_update(None, "journal_mode", "WAL").map_err(|e| e.to_string())?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(|e| e.to_string())?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(|e| e.to_string())?;
        // One transaction for the whole schema: one commit (and fsync) on a first start, not one
        // per statement (a dozen, most of a cold start's first invocation).
        conn.execute_batch(&format!("BEGIN IMMEDIATE;\n{SCHEMA}\nCOMMIT;")).map_err(|e| e.to_string())?;
        add_approval_columns(&mut conn).map_err(|e| e.to_string())?;
        conn.execute_batch(INDEXES).map_err(|e| e.to_string())?;
        Ok(SqliteStore { conn: Arc::new(Mutex::new(conn)) })
    }

    /// Run `f` on the connection off the async workers.
    async fn with<T: Send + 'static>(&self, f: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static) -> Result<T> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut c)
        })
        .await
        .map_err(db_err)?
    }
}

impl SqliteStore {
    /// Read an approval, let `f` change it, and write it back if `f` says it changed — all in one
    /// transaction (the conditional write the approval rules rely on).
    async fn modify_approval<T: Send + 'static>(
        &self,
        id: &str,
        f: impl FnOnce(&mut ApprovalRecord) -> (bool, T) + Send + 'static,
    ) -> Result<(ApprovalRecord, T)> {
        let id = id.to_string();
        self.with(move |c| {
            let tx = c.transaction().map_err(db_err)?;
            let doc: Option<String> =
                tx.query_row("SELECT doc FROM approvals WHERE id = ?1", [&id], |r| r.get(0)).optional().map_err(db_err)?;
            let mut a: ApprovalRecord = match doc {
                Some(d) => from_json(&d)?,
                None => return Err(Error::NotFound(format!("approval `{id}`"))),
            };
            let (changed, out) = f(&mut a);
            if changed {
                tx.execute("UPDATE approvals SET doc = ?2, open = ?3 WHERE id = ?1", params![id, to_json(&a)?, a.why_closed().is_none()])
                    .map_err(db_err)?;
            }
            tx.commit().map_err(db_err)?;
            Ok((a, out))
        })
        .await
    }
}

fn load_run(c: &Connection, id: &str) -> Result<Option<Run>> {
    let doc: Option<String> = c.query_row("SELECT doc FROM runs WHERE id = ?1", [id], |r| r.get(0)).optional().map_err(db_err)?;
    doc.map(|d| from_json(&d)).transpose()
}

#[async_trait]
impl Store for SqliteStore {
    async fn commit_step(&self, c: &StepCommit) -> Result<bool> {
        let c = c.clone();
        self.with(move |conn| {
            let tx = conn.transaction().map_err(db_err)?;
            let exists: Option<i64> = tx
                .query_row("SELECT 1 FROM steps WHERE run_id = ?1 AND key = ?2", params![c.run_id, c.key], |r| r.get(0))
                .optional()
                .map_err(db_err)?;
            if exists.is_some() {
                return Ok(false);
            }
            let mut run = match load_run(&tx, &c.run_id)? {
                Some(r) => r,
                None => {
                    let Some(new_run) = &c.new_run else {
                        return Err(Error::NotFound(format!("run `{}`", c.run_id)));
                    };
                    let seq: i64 = tx
                        .query_row(
                            "INSERT INTO sequences(app, last) VALUES (?1, 1) ON CONFLICT(app) DO UPDATE SET last = last + 1 RETURNING last",
                            [&new_run.app],
                            |r| r.get(0),
                        )
                        .map_err(db_err)?;
                    let mut r = new_run.clone();
                    r.sequence = seq;
                    r
                }
            };
            apply(&mut run, &c);
            tx.execute(
                "INSERT INTO runs(id, app, commit_sha, sequence, created_at, doc) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(id) DO UPDATE SET doc = excluded.doc",
                params![run.id, run.app, run.commit, run.sequence, run.created_at.to_rfc3339(), to_json(&run)?],
            )
            .map_err(db_err)?;
            tx.execute("INSERT INTO steps(run_id, key, outbox) VALUES (?1, ?2, ?3)", params![c.run_id, c.key, to_json(&c.outbox)?])
                .map_err(db_err)?;
            match &c.stage_health {
                // The first unrecovered failure keeps its time.
                Some(StageHealth::Failed(f)) => tx
                    .execute(
                        "INSERT INTO stage_failures(app, stage, doc) VALUES (?1, ?2, ?3) ON CONFLICT(app, stage) DO NOTHING",
                        params![f.app, f.stage, to_json(f)?],
                    )
                    .map_err(db_err)?,
                Some(StageHealth::Recovered { app, stage }) => {
                    tx.execute("DELETE FROM stage_failures WHERE app = ?1 AND stage = ?2", params![app, stage]).map_err(db_err)?
                }
                None => 0,
            };
            tx.commit().map_err(db_err)?;
            Ok(true)
        })
        .await
    }

    async fn step(&self, run_id: &str, key: &str) -> Result<Option<StepRecord>> {
        let (run_id, key) = (run_id.to_string(), key.to_string());
        self.with(move |c| {
            let row: Option<(String, i64)> = c
                .query_row("SELECT outbox, published FROM steps WHERE run_id = ?1 AND key = ?2", params![run_id, key], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()
                .map_err(db_err)?;
            row.map(|(o, p)| Ok(StepRecord { outbox: from_json(&o)?, published: p != 0 })).transpose()
        })
        .await
    }

    async fn mark_published(&self, run_id: &str, key: &str) -> Result<()> {
        let (run_id, key) = (run_id.to_string(), key.to_string());
        self.with(move |c| {
            c.execute("UPDATE steps SET published = 1 WHERE run_id = ?1 AND key = ?2", params![run_id, key]).map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn run(&self, id: &str) -> Result<Option<Run>> {
        let id = id.to_string();
        self.with(move |c| load_run(c, &id)).await
    }

    async fn set_traceparent(&self, run_id: &str, traceparent: &str) -> Result<()> {
        let (id, tp) = (run_id.to_string(), traceparent.to_string());
        self.with(move |c| {
            let tx = c.transaction().map_err(db_err)?;
            if let Some(mut run) = load_run(&tx, &id)? {
                run.traceparent = Some(tp);
                tx.execute("UPDATE runs SET doc = ?2 WHERE id = ?1", params![id, to_json(&run)?]).map_err(db_err)?;
            }
            tx.commit().map_err(db_err)
        })
        .await
    }

    async fn runs(&self, q: &RunQuery) -> Result<Vec<Run>> {
        let q = q.clone();
        self.with(move |c| {
            let limit = if q.limit == 0 { 50 } else { q.limit } as i64;
            let commit = q.commit.map(|s| format!("{}%", s.to_ascii_lowercase().replace(['%', '_'], "")));
            // Two statements, so that each walks its index newest first instead of sorting every run.
            let mut st = c
                .prepare_cached(if q.app.is_some() {
                    "SELECT doc FROM runs WHERE app = ?1 AND (?2 IS NULL OR commit_sha LIKE ?2)
                     ORDER BY created_at DESC, sequence DESC LIMIT ?3"
                } else {
                    "SELECT doc FROM runs WHERE ?1 IS NULL AND (?2 IS NULL OR commit_sha LIKE ?2)
                     ORDER BY created_at DESC, sequence DESC LIMIT ?3"
                })
                .map_err(db_err)?;
            let docs = st
                .query_map(params![q.app, commit, limit], |r| r.get::<_, String>(0))
                .map_err(db_err)?
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(db_err)?;
            docs.iter().map(|d| from_json(d)).collect()
        })
        .await
    }

    async fn put_approval(&self, a: &ApprovalRecord) -> Result<bool> {
        let a = a.clone();
        self.with(move |c| {
            let n = c
                .execute(
                    "INSERT INTO approvals(id, doc, app, stage, open) VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT(id) DO NOTHING",
                    params![a.id, to_json(&a)?, a.app, a.stage, a.why_closed().is_none()],
                )
                .map_err(db_err)?;
            Ok(n == 1)
        })
        .await
    }

    async fn approval(&self, id: &str) -> Result<Option<ApprovalRecord>> {
        let id = id.to_string();
        self.with(move |c| {
            let doc: Option<String> =
                c.query_row("SELECT doc FROM approvals WHERE id = ?1", [&id], |r| r.get(0)).optional().map_err(db_err)?;
            doc.map(|d| from_json(&d)).transpose()
        })
        .await
    }

    async fn vote(&self, id: &str, vote: &Vote) -> Result<(ApprovalRecord, VoteResult)> {
        let vote = vote.clone();
        self.modify_approval(id, move |a| {
            let r = a.apply_vote(&vote);
            (r == VoteResult::Recorded, r)
        })
        .await
    }

    async fn update_approval(&self, id: &str, u: &ApprovalUpdate) -> Result<(ApprovalRecord, bool)> {
        let u = u.clone();
        self.modify_approval(id, move |a| {
            let changed = a.apply_update(&u);
            (changed, changed)
        })
        .await
    }

    async fn open_approvals(&self, app: &str, stage: &str) -> Result<Vec<ApprovalRecord>> {
        let (app, stage) = (app.to_string(), stage.to_string());
        self.with(move |c| {
            let mut st = c.prepare_cached("SELECT doc FROM approvals WHERE app = ?1 AND stage = ?2 AND open = 1").map_err(db_err)?;
            let docs = st
                .query_map(params![app, stage], |r| r.get::<_, String>(0))
                .map_err(db_err)?
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(db_err)?;
            let all: Vec<ApprovalRecord> = docs.iter().map(|d| from_json(d)).collect::<Result<_>>()?;
            Ok(all.into_iter().filter(|a| a.app == app && a.stage == stage && a.why_closed().is_none()).collect())
        })
        .await
    }

    async fn stage_failure(&self, app: &str, stage: &str) -> Result<Option<StageFailure>> {
        let (app, stage) = (app.to_string(), stage.to_string());
        self.with(move |c| {
            let doc: Option<String> = c
                .query_row("SELECT doc FROM stage_failures WHERE app = ?1 AND stage = ?2", params![app, stage], |r| r.get(0))
                .optional()
                .map_err(db_err)?;
            doc.map(|d| from_json(&d)).transpose()
        })
        .await
    }
}
