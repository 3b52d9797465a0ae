//! Which queues, topics and subscriptions exist, and their properties. Read from a file shaped like
//! the Service Bus emulator's `Config.json` (JSON with `//` and `/* */` comments allowed, as the
//! emulator's own sample has them), or built in code. Defaults are Service Bus's, not the
//! emulator's: LockDuration 1 minute, MaxDeliveryCount 10, duplicate detection window 10 minutes,
//! TTL infinite. Every error names the entity and the key.

use crate::error::BusError;
use crate::filter::{CorrelationFilter, SqlAction, SqlFilter};
use serde_json::{Map, Value};
use std::path::Path;
use std::time::Duration;

pub const DEFAULT_LOCK_DURATION: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_DELIVERY_COUNT: u32 = 10;
pub const DEFAULT_DUPLICATE_DETECTION_WINDOW: Duration = Duration::from_secs(600);

/// A TTL at or above this (about 100 years; Service Bus writes TimeSpan.MaxValue) means "never expires".
const INFINITE_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The entities of one namespace.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    /// The namespace name from the file; informational (REST requests are accepted on any host).
    pub namespace: String,
    pub queues: Vec<Queue>,
    pub topics: Vec<Topic>,
}

/// A queue: sent to and received from by name.
#[derive(Debug, Clone, PartialEq)]
pub struct Queue {
    pub name: String,
    pub lock_duration: Duration,
    pub max_delivery_count: u32,
    pub requires_session: bool,
    /// `None`: messages never expire unless they carry their own TTL.
    pub default_message_time_to_live: Option<Duration>,
    pub dead_lettering_on_message_expiration: bool,
    pub requires_duplicate_detection: bool,
    pub duplicate_detection_history_time_window: Duration,
}

/// A topic: sent to by name; each message is copied to every subscription whose rules match.
#[derive(Debug, Clone, PartialEq)]
pub struct Topic {
    pub name: String,
    pub requires_duplicate_detection: bool,
    pub duplicate_detection_history_time_window: Duration,
    pub default_message_time_to_live: Option<Duration>,
    pub subscriptions: Vec<Subscription>,
}

/// A topic subscription: received from as `topic/subscriptions/name`.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    pub name: String,
    pub lock_duration: Duration,
    pub max_delivery_count: u32,
    pub requires_session: bool,
    pub default_message_time_to_live: Option<Duration>,
    pub dead_lettering_on_message_expiration: bool,
    /// No rules: every message matches. Several: a message matches if any rule matches.
    pub rules: Vec<Rule>,
}

/// A named filter with an optional action applied to the subscription's copy.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    pub filter: Filter,
    pub action: Option<SqlAction>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    Correlation(CorrelationFilter),
    Sql(SqlFilter),
}

impl Queue {
    /// A queue with Service Bus's defaults.
    pub fn new(name: impl Into<String>) -> Queue {
        Queue {
            name: name.into(),
            lock_duration: DEFAULT_LOCK_DURATION,
            max_delivery_count: DEFAULT_MAX_DELIVERY_COUNT,
            requires_session: false,
            default_message_time_to_live: None,
            dead_lettering_on_message_expiration: false,
            requires_duplicate_detection: false,
            duplicate_detection_history_time_window: DEFAULT_DUPLICATE_DETECTION_WINDOW,
        }
    }
}

impl Topic {
    /// A topic with Service Bus's defaults and no subscriptions.
    pub fn new(name: impl Into<String>) -> Topic {
        Topic {
            name: name.into(),
            requires_duplicate_detection: false,
            duplicate_detection_history_time_window: DEFAULT_DUPLICATE_DETECTION_WINDOW,
            default_message_time_to_live: None,
            subscriptions: Vec::new(),
        }
    }
}

impl Subscription {
    /// A subscription with Service Bus's defaults and no rules (receives everything).
    pub fn new(name: impl Into<String>) -> Subscription {
        Subscription {
            name: name.into(),
            lock_duration: DEFAULT_LOCK_DURATION,
            max_delivery_count: DEFAULT_MAX_DELIVERY_COUNT,
            requires_session: false,
            default_message_time_to_live: None,
            dead_lettering_on_message_expiration: false,
            rules: Vec::new(),
        }
    }

    /// Add a rule (builder style).
    pub fn with_rule(mut self, rule: Rule) -> Subscription {
        self.rules.push(rule);
        self
    }
}

impl Rule {
    /// A correlation-filter rule.
    pub fn correlation(name: impl Into<String>, filter: CorrelationFilter) -> Rule {
        Rule { name: name.into(), filter: Filter::Correlation(filter), action: None }
    }

    /// A SQL-filter rule; fails if the expression is outside the supported subset.
    pub fn sql(name: impl Into<String>, expression: &str) -> Result<Rule, BusError> {
        let name = name.into();
        let filter =
            SqlFilter::parse(expression).map_err(|e| BusError::Topology(format!("rule `{name}`: SqlExpression {expression:?}: {e}")))?;
        Ok(Rule { name, filter: Filter::Sql(filter), action: None })
    }
}

impl Default for Topology {
    fn default() -> Self {
        Topology::new("local")
    }
}

impl Topology {
    /// An empty topology.
    pub fn new(namespace: impl Into<String>) -> Topology {
        Topology { namespace: namespace.into(), queues: Vec::new(), topics: Vec::new() }
    }

    /// Read and parse a Config.json-shaped file.
    pub fn load(path: impl AsRef<Path>) -> Result<Topology, BusError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| BusError::Topology(format!("cannot read {}: {e}", path.display())))?;
        Topology::from_json_str(&text).map_err(|e| match e {
            BusError::Topology(m) => BusError::Topology(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parse a Config.json-shaped document: `{"UserConfig": {"Namespaces": [{…}]}}` (the
    /// `UserConfig` wrapper is optional). Only the first namespace is used.
    pub fn from_json_str(text: &str) -> Result<Topology, BusError> {
        let cleaned = strip_jsonc(text);
        let doc: Value = serde_json::from_str(&cleaned).map_err(|e| BusError::Topology(format!("not valid JSON: {e}")))?;
        let root = doc.get("UserConfig").unwrap_or(&doc);
        let namespaces = root
            .get("Namespaces")
            .ok_or_else(|| BusError::Topology("UserConfig.Namespaces: missing".into()))?
            .as_array()
            .ok_or_else(|| BusError::Topology("UserConfig.Namespaces: expected an array".into()))?;
        let ns = namespaces.first().ok_or_else(|| BusError::Topology("UserConfig.Namespaces: empty; one namespace is required".into()))?;
        let ns = obj(ns, "namespace", "Namespaces[0]")?;
        let mut topo = Topology::new(opt_str(ns, "namespace", "Name")?.unwrap_or_else(|| "local".into()));
        for (i, q) in list(ns, "namespace", "Queues")?.iter().enumerate() {
            topo.add_queue(parse_queue(q, i)?)?;
        }
        for (i, t) in list(ns, "namespace", "Topics")?.iter().enumerate() {
            topo.add_topic(parse_topic(t, i)?)?;
        }
        Ok(topo)
    }

    /// Add a queue; its name must be new (queues and topics share one name space).
    pub fn add_queue(&mut self, queue: Queue) -> Result<(), BusError> {
        let ctx = format!("queue \"{}\"", queue.name);
        check_entity_name(&queue.name, &ctx, true)?;
        self.check_new_name(&queue.name, &ctx)?;
        check_receiver(&ctx, queue.lock_duration, queue.max_delivery_count)?;
        check_positive(&ctx, "Properties.DuplicateDetectionHistoryTimeWindow", queue.duplicate_detection_history_time_window)?;
        self.queues.push(queue);
        Ok(())
    }

    /// Add a topic with its subscriptions; its name must be new.
    pub fn add_topic(&mut self, topic: Topic) -> Result<(), BusError> {
        let ctx = format!("topic \"{}\"", topic.name);
        check_entity_name(&topic.name, &ctx, true)?;
        self.check_new_name(&topic.name, &ctx)?;
        check_positive(&ctx, "Properties.DuplicateDetectionHistoryTimeWindow", topic.duplicate_detection_history_time_window)?;
        let subscriptions = topic.subscriptions.clone();
        self.topics.push(Topic { subscriptions: Vec::new(), ..topic });
        for s in subscriptions {
            let name = self.topics.last().map(|t| t.name.clone()).unwrap_or_default();
            if let Err(e) = self.add_subscription(&name, s) {
                self.topics.pop();
                return Err(e);
            }
        }
        Ok(())
    }

    /// Add a subscription to an existing topic (the local stack adds its own before opening the broker).
    pub fn add_subscription(&mut self, topic: &str, subscription: Subscription) -> Result<(), BusError> {
        let t = self.topics.iter_mut().find(|t| t.name.eq_ignore_ascii_case(topic)).ok_or_else(|| {
            BusError::Topology(format!("topic \"{topic}\" does not exist (adding subscription \"{}\")", subscription.name))
        })?;
        let ctx = format!("subscription \"{}/{}\"", t.name, subscription.name);
        check_entity_name(&subscription.name, &ctx, false)?;
        if t.subscriptions.iter().any(|s| s.name.eq_ignore_ascii_case(&subscription.name)) {
            return Err(BusError::Topology(format!("{ctx}: Name: declared twice")));
        }
        check_receiver(&ctx, subscription.lock_duration, subscription.max_delivery_count)?;
        for (i, r) in subscription.rules.iter().enumerate() {
            if r.name.trim().is_empty() {
                return Err(BusError::Topology(format!("{ctx}: Rules[{i}].Name: must not be empty")));
            }
            if subscription.rules[..i].iter().any(|o| o.name.eq_ignore_ascii_case(&r.name)) {
                return Err(BusError::Topology(format!("{ctx}: rule \"{}\": Name: declared twice", r.name)));
            }
            if let Filter::Correlation(f) = &r.filter
                && f.is_empty()
            {
                return Err(BusError::Topology(format!("{ctx}: rule \"{}\": CorrelationFilter: needs at least one property", r.name)));
            }
        }
        t.subscriptions.push(subscription);
        Ok(())
    }

    /// Convenience for the local stack: a subscription with default properties that receives the
    /// messages whose Label is one of `labels` (one correlation rule each), or everything when
    /// `labels` is empty.
    pub fn add_local_subscription(&mut self, topic: &str, name: &str, labels: &[&str]) -> Result<(), BusError> {
        let mut sub = Subscription::new(name);
        for (i, label) in labels.iter().enumerate() {
            sub.rules.push(Rule::correlation(format!("label-{i}"), CorrelationFilter::label(*label)));
        }
        self.add_subscription(topic, sub)
    }

    /// The queue named `name` (case-insensitive).
    pub fn queue(&self, name: &str) -> Option<&Queue> {
        self.queues.iter().find(|q| q.name.eq_ignore_ascii_case(name))
    }

    /// The topic named `name` (case-insensitive).
    pub fn topic(&self, name: &str) -> Option<&Topic> {
        self.topics.iter().find(|t| t.name.eq_ignore_ascii_case(name))
    }

    fn check_new_name(&self, name: &str, ctx: &str) -> Result<(), BusError> {
        if self.queue(name).is_some() || self.topic(name).is_some() {
            return Err(BusError::Topology(format!("{ctx}: Name: already used by another queue or topic")));
        }
        Ok(())
    }
}

impl Topic {
    /// The subscription named `name` (case-insensitive).
    pub fn subscription(&self, name: &str) -> Option<&Subscription> {
        self.subscriptions.iter().find(|s| s.name.eq_ignore_ascii_case(name))
    }
}

fn check_entity_name(name: &str, ctx: &str, slash_ok: bool) -> Result<(), BusError> {
    let bad = |why: &str| Err(BusError::Topology(format!("{ctx}: Name: {why}")));
    if name.is_empty() {
        return bad("must not be empty");
    }
    if name.len() > 260 {
        return bad("longer than 260 characters");
    }
    let first_last_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_last_ok(name.chars().next()) || !first_last_ok(name.chars().last()) {
        return bad("must start and end with a letter or digit");
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') || (slash_ok && *c == '/'))) {
        return bad(&format!("character `{c}` is not allowed"));
    }
    if name.split('/').any(|seg| seg.is_empty() || seg.eq_ignore_ascii_case("subscriptions") || seg.eq_ignore_ascii_case("messages")) {
        return bad("a path segment is empty or a reserved word (`subscriptions`, `messages`)");
    }
    Ok(())
}

fn check_receiver(ctx: &str, lock: Duration, max_delivery: u32) -> Result<(), BusError> {
    check_positive(ctx, "Properties.LockDuration", lock)?;
    if max_delivery == 0 {
        return Err(BusError::Topology(format!("{ctx}: Properties.MaxDeliveryCount: must be at least 1")));
    }
    Ok(())
}

fn check_positive(ctx: &str, key: &str, d: Duration) -> Result<(), BusError> {
    if d.is_zero() {
        return Err(BusError::Topology(format!("{ctx}: {key}: must be longer than zero")));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Config.json parsing

fn err(ctx: &str, key: &str, why: impl std::fmt::Display) -> BusError {
    BusError::Topology(format!("{ctx}: {key}: {why}"))
}

fn obj<'a>(v: &'a Value, ctx: &str, key: &str) -> Result<&'a Map<String, Value>, BusError> {
    v.as_object().ok_or_else(|| err(ctx, key, "expected an object"))
}

fn list<'a>(m: &'a Map<String, Value>, ctx: &str, key: &str) -> Result<&'a [Value], BusError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(err(ctx, key, "expected an array")),
    }
}

fn opt_str(m: &Map<String, Value>, ctx: &str, key: &str) -> Result<Option<String>, BusError> {
    str_at(m, ctx, key, "")
}

/// The string `m[key]`; errors show the key as `{prefix}{key}` (its path in the document).
fn str_at(m: &Map<String, Value>, ctx: &str, key: &str, prefix: &str) -> Result<Option<String>, BusError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(err(ctx, &format!("{prefix}{key}"), format!("expected a string, got {other}"))),
    }
}

fn name_of(m: &Map<String, Value>, what: &str, index: usize) -> Result<String, BusError> {
    opt_str(m, &format!("{what} #{index}"), "Name")?.ok_or_else(|| err(&format!("{what} #{index}"), "Name", "missing"))
}

fn props<'a>(m: &'a Map<String, Value>, ctx: &str) -> Result<Option<&'a Map<String, Value>>, BusError> {
    match m.get("Properties") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => Ok(Some(obj(v, ctx, "Properties")?)),
    }
}

fn prop_bool(p: Option<&Map<String, Value>>, ctx: &str, key: &str, default: bool) -> Result<bool, BusError> {
    match p.and_then(|p| p.get(key)) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(err(ctx, &format!("Properties.{key}"), format!("expected true or false, got {other}"))),
    }
}

fn prop_u32(p: Option<&Map<String, Value>>, ctx: &str, key: &str, default: u32) -> Result<u32, BusError> {
    match p.and_then(|p| p.get(key)) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n >= 1)
            .ok_or_else(|| err(ctx, &format!("Properties.{key}"), format!("expected a positive integer, got {v}"))),
    }
}

fn prop_duration(p: Option<&Map<String, Value>>, ctx: &str, key: &str) -> Result<Option<Duration>, BusError> {
    match p.and_then(|p| p.get(key)) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_iso8601_duration(s)
            .map(Some)
            .ok_or_else(|| err(ctx, &format!("Properties.{key}"), format!("expected an ISO 8601 duration like \"PT1M\", got {s:?}"))),
        Some(other) => Err(err(ctx, &format!("Properties.{key}"), format!("expected an ISO 8601 duration string, got {other}"))),
    }
}

fn prop_ttl(p: Option<&Map<String, Value>>, ctx: &str) -> Result<Option<Duration>, BusError> {
    Ok(prop_duration(p, ctx, "DefaultMessageTimeToLive")?.filter(|d| *d < INFINITE_TTL))
}

/// Forwarding is not implemented: accept it only when empty, so a topology that relies on it fails loudly.
fn no_forwarding(p: Option<&Map<String, Value>>, ctx: &str) -> Result<(), BusError> {
    for key in ["ForwardTo", "ForwardDeadLetteredMessagesTo"] {
        match p.and_then(|p| p.get(key)) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s.is_empty() => {}
            Some(other) => {
                return Err(err(
                    ctx,
                    &format!("Properties.{key}"),
                    format!("auto-forwarding is not supported by the local bus (got {other})"),
                ));
            }
        }
    }
    Ok(())
}

fn parse_queue(v: &Value, index: usize) -> Result<Queue, BusError> {
    let m = obj(v, &format!("queue #{index}"), "Queues[]")?;
    let name = name_of(m, "queue", index)?;
    let ctx = format!("queue \"{name}\"");
    let p = props(m, &ctx)?;
    no_forwarding(p, &ctx)?;
    let d = Queue::new(name.clone());
    Ok(Queue {
        lock_duration: prop_duration(p, &ctx, "LockDuration")?.unwrap_or(d.lock_duration),
        max_delivery_count: prop_u32(p, &ctx, "MaxDeliveryCount", d.max_delivery_count)?,
        requires_session: prop_bool(p, &ctx, "RequiresSession", false)?,
        default_message_time_to_live: prop_ttl(p, &ctx)?,
        dead_lettering_on_message_expiration: prop_bool(p, &ctx, "DeadLetteringOnMessageExpiration", false)?,
        requires_duplicate_detection: prop_bool(p, &ctx, "RequiresDuplicateDetection", false)?,
        duplicate_detection_history_time_window: prop_duration(p, &ctx, "DuplicateDetectionHistoryTimeWindow")?
            .unwrap_or(d.duplicate_detection_history_time_window),
        name,
    })
}

fn parse_topic(v: &Value, index: usize) -> Result<Topic, BusError> {
    let m = obj(v, &format!("topic #{index}"), "Topics[]")?;
    let name = name_of(m, "topic", index)?;
    let ctx = format!("topic \"{name}\"");
    let p = props(m, &ctx)?;
    let mut topic = Topic::new(name.clone());
    topic.requires_duplicate_detection = prop_bool(p, &ctx, "RequiresDuplicateDetection", false)?;
    topic.duplicate_detection_history_time_window =
        prop_duration(p, &ctx, "DuplicateDetectionHistoryTimeWindow")?.unwrap_or(topic.duplicate_detection_history_time_window);
    topic.default_message_time_to_live = prop_ttl(p, &ctx)?;
    for (i, s) in list(m, &ctx, "Subscriptions")?.iter().enumerate() {
        topic.subscriptions.push(parse_subscription(s, &name, i)?);
    }
    Ok(topic)
}

fn parse_subscription(v: &Value, topic: &str, index: usize) -> Result<Subscription, BusError> {
    let m = obj(v, &format!("topic \"{topic}\" subscription #{index}"), "Subscriptions[]")?;
    let name = name_of(m, &format!("topic \"{topic}\" subscription"), index)?;
    let ctx = format!("subscription \"{topic}/{name}\"");
    let p = props(m, &ctx)?;
    no_forwarding(p, &ctx)?;
    let d = Subscription::new(name.clone());
    let mut rules = Vec::new();
    for (i, r) in list(m, &ctx, "Rules")?.iter().enumerate() {
        rules.push(parse_rule(r, &ctx, i)?);
    }
    Ok(Subscription {
        lock_duration: prop_duration(p, &ctx, "LockDuration")?.unwrap_or(d.lock_duration),
        max_delivery_count: prop_u32(p, &ctx, "MaxDeliveryCount", d.max_delivery_count)?,
        requires_session: prop_bool(p, &ctx, "RequiresSession", false)?,
        default_message_time_to_live: prop_ttl(p, &ctx)?,
        dead_lettering_on_message_expiration: prop_bool(p, &ctx, "DeadLetteringOnMessageExpiration", false)?,
        rules,
        name,
    })
}

fn parse_rule(v: &Value, sub_ctx: &str, index: usize) -> Result<Rule, BusError> {
    let m = obj(v, sub_ctx, &format!("Rules[{index}]"))?;
    let name_key = format!("Rules[{index}].Name");
    let name = match m.get("Name") {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => return Err(err(sub_ctx, &name_key, "missing")),
        Some(other) => return Err(err(sub_ctx, &name_key, format!("expected a string, got {other}"))),
    };
    let ctx = format!("{sub_ctx}: rule \"{name}\"");
    let p = match m.get("Properties") {
        Some(v) => obj(v, &ctx, "Properties")?,
        None => return Err(err(&ctx, "Properties", "missing")),
    };
    let filter_type = str_at(p, &ctx, "FilterType", "Properties.")?.ok_or_else(|| err(&ctx, "Properties.FilterType", "missing"))?;
    let filter = match filter_type.to_ascii_lowercase().as_str() {
        "correlation" => {
            let key = "Properties.CorrelationFilter";
            let f = obj(p.get("CorrelationFilter").ok_or_else(|| err(&ctx, key, "missing"))?, &ctx, key)?;
            Filter::Correlation(parse_correlation(f, &ctx)?)
        }
        "sql" => {
            let key = "Properties.SqlFilter.SqlExpression";
            let f = obj(p.get("SqlFilter").ok_or_else(|| err(&ctx, "Properties.SqlFilter", "missing"))?, &ctx, "Properties.SqlFilter")?;
            let expr = str_at(f, &ctx, "SqlExpression", "Properties.SqlFilter.")?.ok_or_else(|| err(&ctx, key, "missing"))?;
            Filter::Sql(SqlFilter::parse(&expr).map_err(|e| err(&ctx, key, format!("{expr:?} is not supported by the local bus: {e}")))?)
        }
        other => return Err(err(&ctx, "Properties.FilterType", format!("expected \"Correlation\" or \"Sql\", got {other:?}"))),
    };
    let action = match p.get("Action") {
        None | Some(Value::Null) => None,
        Some(a) => {
            let key = "Properties.Action.SqlExpression";
            let a = obj(a, &ctx, "Properties.Action")?;
            let text = str_at(a, &ctx, "SqlExpression", "Properties.Action.")?.ok_or_else(|| err(&ctx, key, "missing"))?;
            Some(SqlAction::parse(&text).map_err(|e| err(&ctx, key, format!("{text:?} is not supported by the local bus: {e}")))?)
        }
    };
    Ok(Rule { name, filter, action })
}

fn parse_correlation(f: &Map<String, Value>, ctx: &str) -> Result<CorrelationFilter, BusError> {
    let s = |key: &str| str_at(f, ctx, key, "Properties.CorrelationFilter.");
    let properties = match f.get("Properties") {
        None | Some(Value::Null) => Default::default(),
        Some(Value::Object(m)) => m.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        Some(other) => return Err(err(ctx, "Properties.CorrelationFilter.Properties", format!("expected an object, got {other}"))),
    };
    for key in f.keys() {
        if !matches!(
            key.as_str(),
            "ContentType"
                | "CorrelationId"
                | "Label"
                | "Subject"
                | "MessageId"
                | "ReplyTo"
                | "ReplyToSessionId"
                | "SessionId"
                | "To"
                | "Properties"
        ) {
            return Err(err(ctx, &format!("Properties.CorrelationFilter.{key}"), "not a correlation filter property"));
        }
    }
    Ok(CorrelationFilter {
        content_type: s("ContentType")?,
        correlation_id: s("CorrelationId")?,
        label: match s("Label")? {
            Some(l) => Some(l),
            None => s("Subject")?,
        },
        message_id: s("MessageId")?,
        reply_to: s("ReplyTo")?,
        reply_to_session_id: s("ReplyToSessionId")?,
        session_id: s("SessionId")?,
        to: s("To")?,
        properties,
    })
}

/// `PnYnMnWnDTnHnMn.nS` → Duration (a year is 365 days, a month 30). `None` if malformed or empty.
pub fn parse_iso8601_duration(s: &str) -> Option<Duration> {
    let rest = s.trim().strip_prefix(['P', 'p'])?;
    if rest.is_empty() {
        return None;
    }
    let mut secs = 0f64;
    let mut in_time = false;
    let mut number = String::new();
    let mut any = false;
    for c in rest.chars() {
        match c.to_ascii_uppercase() {
            'T' if !in_time && number.is_empty() => in_time = true,
            d if d.is_ascii_digit() || d == '.' || d == ',' => number.push(if d == ',' { '.' } else { d }),
            unit => {
                let n: f64 = number.parse().ok()?;
                number.clear();
                let factor = match (in_time, unit) {
                    (false, 'Y') => 365.0 * 86_400.0,
                    (false, 'M') => 30.0 * 86_400.0,
                    (false, 'W') => 7.0 * 86_400.0,
                    (false, 'D') => 86_400.0,
                    (true, 'H') => 3_600.0,
                    (true, 'M') => 60.0,
                    (true, 'S') => 1.0,
                    _ => return None,
                };
                secs += n * factor;
                any = true;
            }
        }
    }
    if !number.is_empty() || !any || !secs.is_finite() {
        return None;
    }
    // Durations past ~10^10 s are "forever" in practice; saturate instead of failing.
    Some(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
}

/// Remove `//` and `/* */` comments and trailing commas outside strings (the emulator's sample
/// Config.json has comments).
fn strip_jsonc(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut in_string = false;
    while i < chars.len() {
        let c = chars[i];
        if in_string {
            out.push(c);
            if c == '\\' {
                if let Some(n) = chars.get(i + 1) {
                    out.push(*n);
                    i += 1;
                }
            } else if c == '"' {
                in_string = false;
            }
            i += 1;
            continue;
        }
        match (c, chars.get(i + 1)) {
            ('"', _) => {
                in_string = true;
                out.push(c);
                i += 1;
            }
            ('/', Some('/')) => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            ('/', Some('*')) => {
                i += 2;
                while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                    i += 1;
                }
                i += 2;
                out.push(' ');
            }
            (',', _) => {
                // A trailing comma: the next significant character closes the object or array.
                let mut j = i + 1;
                loop {
                    match chars.get(j) {
                        Some(w) if w.is_whitespace() => j += 1,
                        Some('/') if matches!(chars.get(j + 1), Some('/') | Some('*')) => break,
                        _ => break,
                    }
                }
                if !matches!(chars.get(j), Some('}') | Some(']')) {
                    out.push(',');
                }
                i += 1;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn iso8601_durations() {
        assert_eq!(parse_iso8601_duration("PT1M"), Some(Duration::from_secs(60)));
        assert_eq!(parse_iso8601_duration("P14D"), Some(Duration::from_secs(14 * 86_400)));
        assert_eq!(parse_iso8601_duration("P1DT2H3M4S"), Some(Duration::from_secs(86_400 + 7_384)));
        assert_eq!(parse_iso8601_duration("PT0.5S"), Some(Duration::from_millis(500)));
        assert_eq!(parse_iso8601_duration("PT20S"), Some(Duration::from_secs(20)));
        for bad in ["", "P", "PT", "1M", "PT1X", "P1H", "PT1", "PTM"] {
            assert_eq!(parse_iso8601_duration(bad), None, "{bad}");
        }
        assert!(parse_iso8601_duration("P10675199DT2H48M5.4775807S").is_some_and(|d| d >= INFINITE_TTL));
    }

    #[test]
    fn jsonc_comments_and_trailing_commas_are_removed() {
        let s = strip_jsonc("{\"a\": \"x//y\", // c\n \"b\": [1,2,], /* z */ \"c\": \"/*k*/\",}");
        let v: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v, serde_json::json!({"a": "x//y", "b": [1, 2], "c": "/*k*/"}));
    }
}
