//! `deploychain package`'s staging: the zip and folder hold exactly host.json, the policy, the
//! executable `handler` and one `function.json` per function the handler serves, laid out as the
//! Functions host reads them; a policy that does not load is refused before anything is written.
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::path::Path;

fn repo() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap()
}

#[test]
fn the_package_is_laid_out_as_the_functions_host_reads_it() {
    let out = std::env::temp_dir().join(format!("deploychain-package-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    // The layout does not depend on which build of the handler it ships.
    let handler = out.join("handler-build");
    std::fs::write(&handler, b"\x7fELF stand-in for the release handler").unwrap();
    let p = deploychain::package::stage(&repo(), &handler, &repo().join("policy.toml"), &out).unwrap();

    let mut want: Vec<String> = deploychain_functions::FUNCTIONS.iter().map(|(n, _)| format!("{n}/function.json")).collect();
    want.extend(["host.json".to_string(), "policy.toml".to_string(), "handler".to_string()]);
    want.sort();
    assert_eq!(p.files, want);

    let mut zip = zip::ZipArchive::new(std::fs::File::open(&p.zip).unwrap()).unwrap();
    let mut names: Vec<String> = (0..zip.len()).map(|i| zip.by_index(i).unwrap().name().to_string()).collect();
    names.sort();
    assert_eq!(names, want, "the zip holds the same, at its root");
    let h = zip.by_name("handler").unwrap();
    assert_eq!(h.unix_mode().map(|m| m & 0o777), Some(0o755), "the handler is executable");
    drop(h);
    let mut host = String::new();
    zip.by_name("host.json").unwrap().read_to_string(&mut host).unwrap();
    let host: serde_json::Value = serde_json::from_str(&host).unwrap();
    assert_eq!(host["customHandler"]["description"]["defaultExecutablePath"], "handler");
    for (name, _) in deploychain_functions::FUNCTIONS {
        let mut f = String::new();
        zip.by_name(&format!("{name}/function.json")).unwrap().read_to_string(&mut f).unwrap();
        let on_disk = std::fs::read_to_string(repo().join("functions").join(name).join("function.json")).unwrap();
        assert_eq!(f, on_disk, "{name}");
        assert!(p.dir.join(name).join("function.json").is_file());
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(p.dir.join("handler")).unwrap().permissions().mode() & 0o777, 0o755);
    }

    // A policy that does not load is refused, naming it.
    let bad = out.join("bad-policy.toml");
    std::fs::write(&bad, "[[app]]\nname = \"Bad Name\"\n").unwrap();
    let err = deploychain::package::stage(&repo(), &handler, &bad, &out.join("other")).unwrap_err().to_string();
    assert!(err.contains("bad-policy.toml"), "{err}");
    assert!(!out.join("other").join("functionapp").exists(), "nothing staged");
}
