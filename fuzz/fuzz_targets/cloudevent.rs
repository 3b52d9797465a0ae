//! CloudEvent decoding (structured JSON, the bus's body): any bytes decode or fail cleanly, and
//! what decodes encodes back to an event that decodes to the same thing.
#![no_main]

use deploychain_events::DeployEvent;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(ev) = DeployEvent::from_json_bytes(data) else { return };
    let again = DeployEvent::from_json_bytes(&ev.to_json_bytes()).expect("an encoded event decodes");
    assert_eq!(again.to_json_bytes(), ev.to_json_bytes(), "the round trip changed the event");
});
