//! Timer triggers (reference §2.6, §9.9): NCRONTAB schedules with six fields, seconds first
//! (`*/5 * * * * *`), or a `hh:mm:ss` interval; UTC. Each due time invokes the function with the
//! host's `TimerInfo` payload; a failure is only logged (the host does not redeliver timers), and
//! `runOnStartup` fires once when the host starts.

use super::app::TimerTrigger;
use super::envelope::sys;
use super::worker::Worker;
use anyhow::{Result, anyhow, bail};
use chrono::{DateTime, Datelike, Duration as Days, Timelike, Utc};
use serde_json::{Value, json};
use std::time::Duration;
use tokio::sync::watch;

/// A parsed schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    Cron(Cron),
    Every(Duration),
}

/// Six NCRONTAB fields, each expanded to the values it allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    seconds: Vec<u32>,
    minutes: Vec<u32>,
    hours: Vec<u32>,
    days: Vec<u32>,
    months: Vec<u32>,
    weekdays: Vec<u32>,
}

const MONTHS: [&str; 12] = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

fn field(text: &str, min: u32, max: u32, names: &[&str], what: &str) -> Result<Vec<u32>> {
    let value = |s: &str| -> Result<u32> {
        let lower = s.to_ascii_lowercase();
        if let Some(i) = names.iter().position(|n| *n == lower) {
            return Ok(min + i as u32);
        }
        let n: u32 = s.parse().map_err(|_| anyhow!("{what}: `{s}` is not a number"))?;
        // Sunday is 0 or 7.
        let n = if what == "day of week" && n == 7 { 0 } else { n };
        if n < min || n > max {
            bail!("{what}: {n} is outside {min}-{max}");
        }
        Ok(n)
    };
    let mut out = Vec::new();
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (r, s.parse::<u32>().ok().filter(|s| *s > 0).ok_or_else(|| anyhow!("{what}: bad step in `{part}`"))?),
            None => (part, 1),
        };
        let (lo, hi) = match range {
            "*" => (min, max),
            r => match r.split_once('-') {
                Some((a, b)) => (value(a)?, value(b)?),
                None if step > 1 => (value(r)?, max),
                None => (value(r)?, value(r)?),
            },
        };
        if lo > hi {
            bail!("{what}: `{part}` is an empty range");
        }
        out.extend((lo..=hi).step_by(step as usize));
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

impl Schedule {
    /// `*/5 * * * * *` or `00:05:00`.
    pub fn parse(s: &str) -> Result<Schedule> {
        if let Some(d) = super::app::parse_timespan(s).filter(|_| s.contains(':')) {
            if d.is_zero() {
                bail!("a timer interval must be above zero");
            }
            return Ok(Schedule::Every(d));
        }
        let f: Vec<&str> = s.split_whitespace().collect();
        let [sec, min, hour, day, month, dow] = f.as_slice() else {
            bail!("`{s}` is not an NCRONTAB expression of six fields (second minute hour day month day-of-week)");
        };
        Ok(Schedule::Cron(Cron {
            seconds: field(sec, 0, 59, &[], "second")?,
            minutes: field(min, 0, 59, &[], "minute")?,
            hours: field(hour, 0, 23, &[], "hour")?,
            days: field(day, 1, 31, &[], "day")?,
            months: field(month, 1, 12, &MONTHS, "month")?,
            weekdays: field(dow, 0, 6, &WEEKDAYS, "day of week")?,
        }))
    }

    /// The first due time strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Every(d) => Some(t + chrono::Duration::from_std(*d).ok()?),
            Schedule::Cron(c) => c.next_after(t),
        }
    }
}

impl Cron {
    fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut t = t.with_nanosecond(0)? + Days::seconds(1);
        // At most five years of days to look through (a 29 February schedule needs four).
        let limit = t + Days::days(5 * 366);
        while t < limit {
            if !self.months.contains(&t.month()) {
                t = first_of_next_month(t)?;
                continue;
            }
            // Day of month and day of week must both match (NCRONTAB).
            if !self.days.contains(&t.day()) || !self.weekdays.contains(&t.weekday().num_days_from_sunday()) {
                t = (t + Days::days(1)).with_hour(0)?.with_minute(0)?.with_second(0)?;
                continue;
            }
            if !self.hours.contains(&t.hour()) {
                t = (t + Days::hours(1)).with_minute(0)?.with_second(0)?;
                continue;
            }
            if !self.minutes.contains(&t.minute()) {
                t = (t + Days::minutes(1)).with_second(0)?;
                continue;
            }
            if !self.seconds.contains(&t.second()) {
                t += Days::seconds(1);
                continue;
            }
            return Some(t);
        }
        None
    }
}

fn first_of_next_month(t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let (y, m) = if t.month() == 12 { (t.year() + 1, 1) } else { (t.year(), t.month() + 1) };
    t.with_day(1)?.with_hour(0)?.with_minute(0)?.with_second(0)?.with_month(m)?.with_year(y)
}

fn net_date(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S").to_string()
}

/// The invocation the host sends for one tick (§2.6).
pub fn timer_envelope(
    function: &str,
    trigger: &TimerTrigger,
    scheduled: DateTime<Utc>,
    last: Option<DateTime<Utc>>,
    next: Option<DateTime<Utc>>,
) -> Value {
    let past_due = Utc::now() - scheduled > Days::seconds(1);
    let status = if trigger.use_monitor {
        json!({ "Last": last.map(net_date), "Next": next.map(net_date), "LastUpdated": net_date(Utc::now()) })
    } else {
        Value::Null
    };
    json!({
        "Data": { trigger.binding.clone(): { "Schedule": { "AdjustForDST": true }, "ScheduleStatus": status, "IsPastDue": past_due } },
        "Metadata": { "sys": sys(function) }
    })
}

/// Fire `trigger` on its schedule until `stop`.
pub async fn run(function: String, trigger: TimerTrigger, worker: Worker, timeout: Duration, mut stop: watch::Receiver<bool>) {
    let mut last: Option<DateTime<Utc>> = None;
    if trigger.run_on_startup {
        let now = Utc::now();
        fire(&function, &trigger, &worker, timeout, now, None, trigger.schedule.next_after(now)).await;
        last = Some(now);
    }
    loop {
        let Some(due) = trigger.schedule.next_after(last.unwrap_or_else(Utc::now).max(Utc::now())) else {
            tracing::error!(target: "host", function, "the timer schedule never comes due");
            return;
        };
        let wait = (due - Utc::now()).to_std().unwrap_or_default();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        fire(&function, &trigger, &worker, timeout, due, last, trigger.schedule.next_after(due)).await;
        last = Some(due);
    }
}

async fn fire(
    function: &str,
    trigger: &TimerTrigger,
    worker: &Worker,
    timeout: Duration,
    due: DateTime<Utc>,
    last: Option<DateTime<Utc>>,
    next: Option<DateTime<Utc>>,
) {
    let envelope = timer_envelope(function, trigger, due, last, next);
    match worker.invoke(function, &envelope, timeout).await {
        Ok(a) if (200..300).contains(&a.status) => tracing::debug!(target: "host", function, "timer invocation done"),
        // Timers are not redelivered: a failure is logged.
        Ok(a) => tracing::warn!(target: "host", function, status = a.status, "timer invocation failed"),
        Err(e) => tracing::warn!(target: "host", function, "timer invocation failed: {e:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&Utc)).unwrap_or_default()
    }

    #[test]
    fn ncrontab_schedules_come_due_when_they_say() {
        let next = |expr: &str, from: &str| Schedule::parse(expr).ok().and_then(|s| s.next_after(at(from))).map(|t| t.to_rfc3339());
        assert_eq!(next("*/5 * * * * *", "2026-12-01T10:00:03Z").as_deref(), Some("2026-12-01T10:00:05+00:00"));
        assert_eq!(next("0 */5 * * * *", "2026-12-01T10:00:00Z").as_deref(), Some("2026-12-01T10:05:00+00:00"));
        assert_eq!(next("0 30 9 * * 1-5", "2026-12-04T10:00:00Z").as_deref(), Some("2026-12-07T09:30:00+00:00"), "Friday → Monday");
        assert_eq!(next("0 0 0 1 Jan *", "2026-12-01T00:00:00Z").as_deref(), Some("2027-01-01T00:00:00+00:00"));
        assert_eq!(next("0 0 12 29 2 *", "2026-03-01T00:00:00Z").as_deref(), Some("2028-02-29T12:00:00+00:00"));
        assert_eq!(next("0 0 8 * * Sun", "2026-12-01T00:00:00Z").as_deref(), Some("2026-12-06T08:00:00+00:00"));
        assert_eq!(next("00:00:30", "2026-12-01T00:00:00Z").as_deref(), Some("2026-12-01T00:00:30+00:00"));
        assert!(Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).single().is_some());
        for bad in ["* * * * *", "61 * * * * *", "* * * 0 * *", "*/0 * * * * *", "5-1 * * * * *", "00:00:00"] {
            assert!(Schedule::parse(bad).is_err(), "{bad}");
        }
    }
}
