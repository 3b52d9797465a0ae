//! Approval tokens: nothing but a token signed with the key verifies. The input either is a token
//! (any string; first byte even) or edits a real one (byte positions and values; first byte odd);
//! whatever differs from the real token must not verify.
#![no_main]

use deploychain_fuzz::{links, real_token};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn real() -> &'static str {
    static T: OnceLock<String> = OnceLock::new();
    T.get_or_init(real_token)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let real = real();
    let candidate = if mode & 1 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        let mut t = real.as_bytes().to_vec();
        for pair in rest.chunks(2) {
            if let [at, value] = pair {
                let i = usize::from(*at) % t.len();
                t[i] = *value;
            }
        }
        String::from_utf8_lossy(&t).into_owned()
    };
    let verified = links().verify(&candidate, chrono::Utc::now());
    if candidate == real {
        assert!(verified.is_ok(), "the real token stopped verifying");
    } else {
        assert!(verified.is_err(), "an edited or made-up token verified: {candidate}");
    }
});
