//! The GitHub webhook as the host delivers it: any body, any event name, signed as GitHub signs
//! (so the parser is reached) or forged. A 5xx, a panic or a forged body that gets anywhere is a
//! finding.
#![no_main]

use deploychain_fuzz::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else { return };
    let event = WEBHOOK_EVENTS[usize::from(selector & 0x7f) % WEBHOOK_EVENTS.len()];
    let forged = selector & 0x80 != 0;
    // The host hands a JSON body over as text (invalid UTF-8 is replaced on the way in).
    let body = String::from_utf8_lossy(body);
    let signature = if forged { format!("sha256={}", "0".repeat(64)) } else { github_signature(body.as_bytes()) };
    let h = handler();
    let (host, out) = invoke(&h, "github_webhook", github_envelope(event, signature, body.into_owned().into_bytes()));
    let (status, text) = http_result(host, &out);
    assert!(status < 500, "a webhook body got {status}: {text}");
    if forged {
        assert_eq!(status, 401, "a forged body got {status}: {text}");
        assert!(h.published.sent().is_empty(), "a forged body published something");
    }
});
