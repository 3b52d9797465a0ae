//! The custom-handler envelope itself: any bytes POSTed to any function, as a broken or hostile
//! host (or a bug in one) might. The handler must answer the protocol's JSON, never panic, and
//! when it refuses an envelope (a 4xx, or a 5xx so the host keeps the message for a retry or its
//! dead-letter queue) say why in the invocation's logs and publish nothing.
#![no_main]

use deploychain_fuzz::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else { return };
    let function = ENVELOPE_FUNCTIONS[usize::from(selector) % ENVELOPE_FUNCTIONS.len()];
    let h = handler();
    let (status, out) = invoke(&h, function, body.to_vec());
    let text = String::from_utf8_lossy(&out);
    if status >= 400 {
        let v: serde_json::Value =
            serde_json::from_slice(&out).unwrap_or_else(|e| panic!("{function}: a {status} that is not JSON ({e}): {text}"));
        let logs = v["Logs"].as_array().map(Vec::len).unwrap_or(0);
        assert!(logs > 0 || status < 500, "{function}: {status} without a reason in Logs: {text}");
        assert!(h.published.sent().is_empty(), "{function}: a refused envelope published something: {text}");
    }
});
