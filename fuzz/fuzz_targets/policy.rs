//! The pipeline policy parser: any text parses or is refused with an error, never a panic; a
//! policy that parses answers the lookups the handler makes on every event.
#![no_main]

use deploychain_functions::policy::Policy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(policy) = Policy::from_toml(text) else { return };
    for app in &policy.apps {
        assert!(policy.app(&app.name).is_some(), "app `{}` is not found by its name", app.name);
        for (i, stage) in app.stages.iter().enumerate() {
            assert_eq!(app.stage(&stage.name).map(|(j, _)| j), Some(i), "stage `{}` of `{}`", stage.name, app.name);
        }
        let _ = policy.expand(&app.stages.iter().flat_map(|s| s.approval.iter().flat_map(|a| a.approvers.clone())).collect::<Vec<_>>());
    }
});
