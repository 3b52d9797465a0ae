//! Simulated VM scale sets that survive restarts: what each target runs and every rollout, in a
//! SQLite file. The local stack and demos run the handler with it (`DEPLOYCHAIN_COMPUTE=simulated`)
//! until the ARM scale-set adapter is configured. Same fencing rule as every backend
//! ([`super::memory::fence`]). Targets whose resource name contains one of `fail_targets` fail
//! their health check and are rolled back, to rehearse failures.

use super::memory::{TargetState, fence};
use super::*;
use crate::error::Error;
use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;
use std::sync::{Arc, Mutex};

pub struct SimulatedScaleSets {
    conn: Arc<Mutex<Connection>>,
    fail_targets: Vec<String>,
}

fn db_err(e: impl std::fmt::Display) -> Error {
    Error::Transient(format!("simulated scale sets: {e}"))
}

/// One recorded rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    pub run_id: String,
    pub stage: String,
    pub target: String,
    pub image: String,
}

impl SimulatedScaleSets {
    pub fn open(path: &Path, fail_targets: Vec<String>) -> std::result::Result<SimulatedScaleSets, String> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let conn = Connection::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(|e| e.to_string())?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(|e| e.to_string())?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS targets (target TEXT PRIMARY KEY, state TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS rollouts (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, stage TEXT NOT NULL,
               target TEXT NOT NULL, image TEXT NOT NULL, at TEXT NOT NULL);",
        )
        .map_err(|e| e.to_string())?;
        Ok(SimulatedScaleSets { conn: Arc::new(Mutex::new(conn)), fail_targets })
    }

    /// Every rollout that changed a target, oldest first.
    pub fn rollouts(path: &Path) -> std::result::Result<Vec<Rollout>, String> {
        let conn = Connection::open(path).map_err(|e| e.to_string())?;
        let mut st = conn.prepare("SELECT run_id, stage, target, image FROM rollouts ORDER BY id").map_err(|e| e.to_string())?;
        let rows = st
            .query_map([], |r| Ok(Rollout { run_id: r.get(0)?, stage: r.get(1)?, target: r.get(2)?, image: r.get(3)? }))
            .map_err(|e| e.to_string())?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        Ok(rows)
    }
}

#[async_trait]
impl Compute for SimulatedScaleSets {
    async fn deploy(&self, req: &DeployRequest) -> Result<DeployOutcome> {
        let (conn, req) = (self.conn.clone(), req.clone());
        let fails = self.fail_targets.iter().any(|f| req.target.rsplit('/').next().is_some_and(|name| name.contains(f.as_str())));
        tokio::task::spawn_blocking(move || {
            let mut c = conn.lock().unwrap_or_else(|e| e.into_inner());
            let tx = c.transaction().map_err(db_err)?;
            let current: Option<TargetState> = tx
                .query_row("SELECT state FROM targets WHERE target = ?1", [&req.target], |r| r.get::<_, String>(0))
                .optional()
                .map_err(db_err)?
                .map(|s| serde_json::from_str(&s))
                .transpose()
                .map_err(db_err)?;
            if let Some(done) = fence(current.as_ref(), &req) {
                return Ok(done);
            }
            if fails {
                return Ok(DeployOutcome::RolledBack {
                    reason: "simulated health check failed on 1 of 2 instances".into(),
                    restored: current.map(|c| c.image),
                });
            }
            let state = TargetState { image: req.image.clone(), run_id: req.run_id.clone(), sequence: req.sequence };
            tx.execute(
                "INSERT INTO targets(target, state) VALUES (?1, ?2) ON CONFLICT(target) DO UPDATE SET state = excluded.state",
                params![req.target, serde_json::to_string(&state).map_err(db_err)?],
            )
            .map_err(db_err)?;
            tx.execute(
                "INSERT INTO rollouts(run_id, stage, target, image, at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![req.run_id, req.stage, req.target, req.image.id, chrono::Utc::now().to_rfc3339()],
            )
            .map_err(db_err)?;
            tx.commit().map_err(db_err)?;
            Ok(DeployOutcome::Succeeded)
        })
        .await
        .map_err(db_err)?
    }
}
