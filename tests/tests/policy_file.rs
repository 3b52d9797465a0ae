//! The policy shipped in the repository root loads.
#![allow(clippy::unwrap_used)]

#[test]
fn the_shipped_policy_is_valid() {
    let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy.toml")).unwrap();
    let p = deploychain_functions::policy::Policy::from_toml(&text).unwrap();
    assert_eq!(p.apps[0].name, "web");
    assert!(p.github_app("octo-org/web", "release/2026.11").is_some());
}
