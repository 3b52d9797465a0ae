//! In-memory backends for step and router tests: hand-written fakes that record what they were
//! asked and can be told to fail. [`fence`] is the one rule every `Compute` backend applies.

use super::*;
use crate::error::Error;
use std::collections::HashMap;
use std::sync::Mutex;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic in another test thread must not hide this one's result.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
pub struct MemoryPublisher {
    pub sent: Mutex<Vec<Outbound>>,
    pub parked: Mutex<Vec<Parked>>,
    /// When set, every publish fails with a transient error (the bus is down).
    pub down: std::sync::atomic::AtomicBool,
}

impl MemoryPublisher {
    pub fn sent(&self) -> Vec<Outbound> {
        lock(&self.sent).clone()
    }
    pub fn parked(&self) -> Vec<Parked> {
        lock(&self.parked).clone()
    }
    /// The distinct event types sent, in order of first appearance.
    pub fn types(&self) -> Vec<String> {
        lock(&self.sent).iter().map(|m| m.subject.trim_start_matches("dev.deploychain.").trim_end_matches(".v1").to_string()).collect()
    }
    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }
    fn check(&self) -> Result<()> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::Transient("the bus is unavailable".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl Publish for MemoryPublisher {
    async fn publish(&self, msg: &Outbound) -> Result<()> {
        self.check()?;
        lock(&self.sent).push(msg.clone());
        Ok(())
    }
    async fn park(&self, msg: &Parked) -> Result<()> {
        self.check()?;
        lock(&self.parked).push(msg.clone());
        Ok(())
    }
}

#[derive(Default)]
struct StoreState {
    runs: HashMap<String, Run>,
    steps: HashMap<(String, String), StepRecord>,
    approvals: HashMap<String, ApprovalRecord>,
    sequences: HashMap<String, i64>,
    stage_failures: HashMap<(String, String), StageFailure>,
}

/// A `Store` with the same semantics as the SQLite one, for tests.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<StoreState>,
}

#[async_trait]
impl Store for MemoryStore {
    async fn commit_step(&self, c: &StepCommit) -> Result<bool> {
        let mut st = lock(&self.state);
        let key = (c.run_id.clone(), c.key.clone());
        if st.steps.contains_key(&key) {
            return Ok(false);
        }
        if let Some(new_run) = &c.new_run
            && !st.runs.contains_key(&new_run.id)
        {
            let seq = st.sequences.entry(new_run.app.clone()).or_insert(0);
            *seq += 1;
            let mut r = new_run.clone();
            r.sequence = *seq;
            st.runs.insert(r.id.clone(), r);
        }
        let run = st.runs.get_mut(&c.run_id).ok_or_else(|| Error::NotFound(format!("run `{}`", c.run_id)))?;
        apply(run, c);
        match &c.stage_health {
            Some(StageHealth::Failed(f)) => {
                st.stage_failures.entry((f.app.clone(), f.stage.clone())).or_insert_with(|| f.clone());
            }
            Some(StageHealth::Recovered { app, stage }) => {
                st.stage_failures.remove(&(app.clone(), stage.clone()));
            }
            None => {}
        }
        st.steps.insert(key, StepRecord { outbox: c.outbox.clone(), published: false });
        Ok(true)
    }
    async fn step(&self, run_id: &str, key: &str) -> Result<Option<StepRecord>> {
        Ok(lock(&self.state).steps.get(&(run_id.to_string(), key.to_string())).cloned())
    }
    async fn mark_published(&self, run_id: &str, key: &str) -> Result<()> {
        if let Some(s) = lock(&self.state).steps.get_mut(&(run_id.to_string(), key.to_string())) {
            s.published = true;
        }
        Ok(())
    }
    async fn run(&self, id: &str) -> Result<Option<Run>> {
        Ok(lock(&self.state).runs.get(id).cloned())
    }
    async fn set_traceparent(&self, run_id: &str, traceparent: &str) -> Result<()> {
        if let Some(r) = lock(&self.state).runs.get_mut(run_id) {
            r.traceparent = Some(traceparent.to_string());
        }
        Ok(())
    }
    async fn runs(&self, q: &RunQuery) -> Result<Vec<Run>> {
        let st = lock(&self.state);
        let mut v: Vec<Run> = st
            .runs
            .values()
            .filter(|r| q.app.as_deref().is_none_or(|a| a == r.app))
            .filter(|r| q.commit.as_deref().is_none_or(|c| r.commit.starts_with(&c.to_ascii_lowercase())))
            .cloned()
            .collect();
        v.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.sequence.cmp(&a.sequence)));
        v.truncate(if q.limit == 0 { 50 } else { q.limit });
        Ok(v)
    }
    async fn put_approval(&self, a: &ApprovalRecord) -> Result<bool> {
        let mut st = lock(&self.state);
        if st.approvals.contains_key(&a.id) {
            return Ok(false);
        }
        st.approvals.insert(a.id.clone(), a.clone());
        Ok(true)
    }
    async fn approval(&self, id: &str) -> Result<Option<ApprovalRecord>> {
        Ok(lock(&self.state).approvals.get(id).cloned())
    }
    async fn vote(&self, id: &str, vote: &Vote) -> Result<(ApprovalRecord, VoteResult)> {
        let mut st = lock(&self.state);
        let a = st.approvals.get_mut(id).ok_or_else(|| Error::NotFound(format!("approval `{id}`")))?;
        let result = a.apply_vote(vote);
        Ok((a.clone(), result))
    }

    async fn update_approval(&self, id: &str, u: &ApprovalUpdate) -> Result<(ApprovalRecord, bool)> {
        let mut st = lock(&self.state);
        let a = st.approvals.get_mut(id).ok_or_else(|| Error::NotFound(format!("approval `{id}`")))?;
        let changed = a.apply_update(u);
        Ok((a.clone(), changed))
    }

    async fn open_approvals(&self, app: &str, stage: &str) -> Result<Vec<ApprovalRecord>> {
        let st = lock(&self.state);
        Ok(st.approvals.values().filter(|a| a.app == app && a.stage == stage && a.why_closed().is_none()).cloned().collect())
    }
    async fn stage_failure(&self, app: &str, stage: &str) -> Result<Option<StageFailure>> {
        Ok(lock(&self.state).stage_failures.get(&(app.to_string(), stage.to_string())).cloned())
    }
}

/// Apply a step's changes to a run (shared by the memory and SQLite stores).
pub(crate) fn apply(run: &mut Run, c: &StepCommit) {
    run.steps.extend(c.entries.iter().cloned());
    run.status = c.status;
    run.waiting_for = c.waiting_for.clone();
    if c.image.is_some() {
        run.image = c.image.clone();
    }
    if c.stage.is_some() {
        run.stage = c.stage.clone();
    }
    if let Some(last) = c.entries.last() {
        run.updated_at = last.at;
    }
}

/// Records build requests; a second request for the same run is not a second build.
#[derive(Default)]
pub struct MemoryBuilds {
    pub requests: Mutex<Vec<BuildRequest>>,
    /// When set, every build is refused with this message (as a CI system refuses a bad request).
    pub refuse: Mutex<Option<String>>,
}

#[async_trait]
impl BuildSystem for MemoryBuilds {
    async fn request_build(&self, req: &BuildRequest) -> Result<BuildStarted> {
        if let Some(m) = lock(&self.refuse).clone() {
            return Err(Error::Refused(m));
        }
        let mut r = lock(&self.requests);
        if !r.iter().any(|x| x.run_id == req.run_id) {
            r.push(req.clone());
        }
        Ok(BuildStarted::default())
    }
}

#[derive(Default)]
pub struct MemoryBaker {
    pub requests: Mutex<Vec<ImageRequest>>,
    /// What `request_image` answers (default: [`BakeStarted::Reported`]).
    pub start: Mutex<Option<BakeStarted>>,
    /// What each `check_image` answers in turn (when spent: still running).
    pub looks: Mutex<std::collections::VecDeque<BakeStatus>>,
    /// Bakes looked at, in order.
    pub looked: Mutex<Vec<String>>,
    /// When set, every image is refused with this message.
    pub refuse: Mutex<Option<String>>,
}

#[async_trait]
impl ImageBaker for MemoryBaker {
    async fn request_image(&self, req: &ImageRequest) -> Result<BakeStarted> {
        if let Some(m) = lock(&self.refuse).clone() {
            return Err(Error::Refused(m));
        }
        let mut r = lock(&self.requests);
        if !r.iter().any(|x| x.run_id == req.run_id) {
            r.push(req.clone());
        }
        Ok(lock(&self.start).clone().unwrap_or(BakeStarted::Reported))
    }
    async fn check_image(&self, _req: &ImageRequest, bake: &str) -> Result<BakeStatus> {
        lock(&self.looked).push(bake.to_string());
        Ok(lock(&self.looks).pop_front().unwrap_or(BakeStatus::Running("Building".into())))
    }
}

/// What a simulated scale set runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetState {
    pub image: ImageRef,
    pub run_id: String,
    pub sequence: i64,
}

/// Simulated scale sets: desired state per target, fenced by run sequence, with scripted failures.
#[derive(Default)]
pub struct MemoryCompute {
    pub targets: Mutex<HashMap<String, TargetState>>,
    /// Every rollout that changed a target (a no-op redeploy is not counted).
    pub rollouts: Mutex<Vec<DeployRequest>>,
    /// Targets whose next rollouts fail health checks (and are rolled back).
    pub failing: Mutex<Vec<String>>,
    /// Looks a rollout takes after its start (0: it ends in its first step).
    pub looks: Mutex<u32>,
    /// What each target ran before its latest rollout (what an abort restores).
    pub before: Mutex<HashMap<String, Option<ImageRef>>>,
    /// The wait each look asks for before the next.
    pub look_every: Mutex<std::time::Duration>,
    /// Errors the next looks fail with, in order (throttling, an outage).
    pub faults: Mutex<std::collections::VecDeque<Error>>,
    /// Looks taken (each `advance`).
    pub advanced: Mutex<u32>,
}

impl MemoryCompute {
    pub fn rollouts(&self) -> Vec<DeployRequest> {
        lock(&self.rollouts).clone()
    }
    pub fn fail_target(&self, target: &str) {
        lock(&self.failing).push(target.to_string());
    }
    pub fn current(&self, target: &str) -> Option<TargetState> {
        lock(&self.targets).get(target).cloned()
    }
}

/// The fencing rule every scale-set backend applies: redeploying what a target already runs for the
/// same run is a no-op success; an older run never replaces a newer one. Artifacts compare by their
/// immutable `id` (a target records only that).
pub fn fence(current: Option<&TargetState>, req: &DeployRequest) -> Option<DeployOutcome> {
    let cur = current?;
    if cur.image.id == req.image.id && cur.run_id == req.run_id {
        return Some(DeployOutcome::Succeeded);
    }
    (cur.sequence > req.sequence).then(|| DeployOutcome::Stale {
        reason: format!("target runs {} from newer run {} (sequence {} > {})", cur.image.id, cur.run_id, cur.sequence, req.sequence),
    })
}

#[async_trait]
impl Compute for MemoryCompute {
    async fn advance(&self, req: &DeployRequest, cursor: &serde_json::Value) -> Result<Progress> {
        *lock(&self.advanced) += 1;
        if let Some(e) = lock(&self.faults).pop_front() {
            return Err(e);
        }
        let every = *lock(&self.look_every);
        let done = |outcome| Ok(Progress::Done { outcome, milestones: Vec::new() });
        let look = |n: u64| {
            Ok(Progress::Continue {
                cursor: serde_json::json!({ "look": n }),
                after: every,
                status: format!("simulated rollout to {}: look {n}", req.target),
                milestones: Vec::new(),
            })
        };
        if cursor.get("rollback").is_some() {
            let restored = cursor.get("restored").and_then(|r| serde_json::from_value::<ImageRef>(r.clone()).ok());
            let reason = cursor["rollback"].as_str().unwrap_or_default().to_string();
            if let Some(image) = &restored {
                lock(&self.targets).insert(req.target.clone(), TargetState { image: image.clone(), run_id: String::new(), sequence: 0 });
            }
            return done(DeployOutcome::RolledBack { reason, restored });
        }
        if let Some(n) = cursor.get("look").and_then(|n| n.as_u64()) {
            return if n >= u64::from(*lock(&self.looks)) { done(DeployOutcome::Succeeded) } else { look(n + 1) };
        }
        let mut targets = lock(&self.targets);
        if let Some(outcome) = fence(targets.get(&req.target), req) {
            return done(outcome);
        }
        if lock(&self.failing).iter().any(|t| t == &req.target) {
            let restored = targets.get(&req.target).map(|c| c.image.clone());
            return done(DeployOutcome::RolledBack { reason: "health check failed on 1 of 2 instances".into(), restored });
        }
        let before = targets
            .insert(req.target.clone(), TargetState { image: req.image.clone(), run_id: req.run_id.clone(), sequence: req.sequence });
        lock(&self.rollouts).push(req.clone());
        *lock(&self.before).entry(req.target.clone()).or_default() = before.map(|b| b.image);
        if *lock(&self.looks) > 0 { look(1) } else { done(DeployOutcome::Succeeded) }
    }

    fn abort(&self, req: &DeployRequest, cursor: &serde_json::Value, reason: &str) -> Option<serde_json::Value> {
        if cursor.is_null() || cursor.get("rollback").is_some() {
            return None;
        }
        let restored = lock(&self.before).get(&req.target).cloned().flatten();
        Some(serde_json::json!({ "rollback": reason, "restored": restored }))
    }
}

#[derive(Default)]
pub struct MemoryNotify {
    pub notices: Mutex<Vec<ApprovalNotice>>,
    pub stuck: Mutex<Vec<StuckNotice>>,
}

impl MemoryNotify {
    pub fn notices(&self) -> Vec<ApprovalNotice> {
        lock(&self.notices).clone()
    }
    pub fn stuck(&self) -> Vec<StuckNotice> {
        lock(&self.stuck).clone()
    }
}

#[async_trait]
impl Notify for MemoryNotify {
    async fn approval_requested(&self, n: &ApprovalNotice) -> Result<()> {
        let mut v = lock(&self.notices);
        // As a receiver de-duplicating by notice id would: one of each notice.
        if !v.iter().any(|x| x.approval_id == n.approval_id && x.key == n.key) {
            v.push(n.clone());
        }
        Ok(())
    }

    async fn run_stuck(&self, n: &StuckNotice) -> Result<()> {
        lock(&self.stuck).push(n.clone());
        Ok(())
    }
}
