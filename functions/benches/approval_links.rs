//! Approval link verification: a benchmark that prints figures, not a timed test.
//! `cargo bench -p deploychain-functions --bench approval_links` (optionally `-- N`, default 200000).
//!
//! It measures, in the same run and over the same token bytes: a raw HMAC-SHA256 check (the
//! floor), the full `ApprovalLinks::verify` (shape, key id, constant-time MAC check, claims
//! decoding, expiry), verification when the key was rotated (the token's key is the second of two),
//! and the refusal of a tampered token. Figures are ratios against the floor.

use deploychain_functions::links::{ApprovalLinks, Claims, artifact_digest};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::hint::black_box;
use std::time::{Duration, Instant};

fn time(n: usize, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        assert!(black_box(f()));
    }
    start.elapsed()
}

fn main() {
    let n: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(200_000);
    let base = url::Url::parse("https://deploychain.azurewebsites.net").expect("url");
    let old_key = b"the-previous-approval-signing-key-0123456789";
    let key = b"the-current-approval-signing-key-0123456789ab";
    let links = ApprovalLinks::new(key, &[], base.clone());
    let rotated = ApprovalLinks::new(b"a-newer-signing-key-than-both-of-them-0123", &[key, old_key], base);
    let claims = Claims {
        approval: "web-738a951d2f3e.production".into(),
        run: "web-738a951d2f3e".into(),
        stage: "production".into(),
        artifact: artifact_digest("/subscriptions/0/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/web/versions/1.0.42"),
        approver: "alice@contoso.com".into(),
        exp: chrono::Utc::now().timestamp() + 86_400,
    };
    let token = links.token(&claims);
    let signed = token.rsplit_once('.').map(|(s, _)| s.to_string()).expect("a token");
    let tag = {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("key");
        m.update(signed.as_bytes());
        m.finalize().into_bytes()
    };
    // One character of the claims changed: refused by the MAC check, not by a cheaper test.
    let mut tampered = token.clone();
    let at = token.match_indices('.').nth(1).map(|(i, _)| i + 5).expect("claims");
    tampered.replace_range(at..at + 1, if &tampered[at..at + 1] == "A" { "B" } else { "A" });
    let now = chrono::Utc::now();

    // Warm up, then measure each in the same run.
    let _ = time(n / 10, || links.verify(&token, now).is_ok());
    let floor = time(n, || {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("key");
        m.update(signed.as_bytes());
        m.verify_slice(&tag).is_ok()
    });
    let verify = time(n, || links.verify(&token, now).is_ok());
    let rotated_t = time(n, || rotated.verify(&token, now).is_ok());
    let refuse = time(n, || links.verify(&tampered, now).is_err());
    let per = |d: Duration| d.as_secs_f64() * 1e9 / n as f64;
    println!("approval link verification, {n} tokens of {} bytes", token.len());
    println!("  raw HMAC-SHA256 check (floor)   {:>8.0} ns/token  1.00×", per(floor));
    for (name, d) in [("ApprovalLinks::verify", verify), ("verify, key rotated (2nd key)", rotated_t), ("refuse a tampered token", refuse)]
    {
        println!(
            "  {name:<31} {:>8.0} ns/token  {:.2}× the floor  ({:.0} tokens/s)",
            per(d),
            per(d) / per(floor),
            n as f64 / d.as_secs_f64()
        );
    }
}
