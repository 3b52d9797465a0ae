//! `deploychain package`'s staging: the zip and folder hold exactly host.json, the policy, the
//! executable `handler` and one `function.json` per function the handler serves, laid out as the
//! Functions host reads them; a policy that does not load is refused before anything is written.
//! The handler it ships is static and keeps its executable bit in the zip, and a package that
//! lost the bit does not start in the local stack, as it would not on Flex Consumption.
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
        // Unpacked as the platform lays it out: the modes the zip records, the same files.
        let app = out.join("unpacked");
        let names = deploychain::package::unpack(&p.zip, &app).unwrap();
        assert_eq!(names, want);
        assert_eq!(std::fs::metadata(app.join("handler")).unwrap().permissions().mode() & 0o777, 0o755);
        assert_eq!(std::fs::metadata(app.join("host.json")).unwrap().permissions().mode() & 0o777, 0o644);
        assert_eq!(std::fs::read(app.join("handler")).unwrap(), std::fs::read(&handler).unwrap());
    }

    // A policy that does not load is refused, naming it.
    let bad = out.join("bad-policy.toml");
    std::fs::write(&bad, "[[app]]\nname = \"Bad Name\"\n").unwrap();
    let err = deploychain::package::stage(&repo(), &handler, &bad, &out.join("other")).unwrap_err().to_string();
    assert!(err.contains("bad-policy.toml"), "{err}");
    assert!(!out.join("other").join("functionapp").exists(), "nothing staged");
}

/// What `deploychain package` ships, built as it builds it (release, musl): the zip's `handler` is
/// a regular file with mode 0755 recorded by a Unix "made by" (what Flex Consumption mounts), and
/// it names no interpreter and no shared library, so any worker image runs it.
#[test]
fn the_shipped_handler_is_static_and_executable_in_the_zip() {
    let repo = repo();
    let out = std::env::temp_dir().join(format!("deploychain-package-static-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let handler = deploychain::package::build_handler(&repo).unwrap();
    let p = deploychain::package::stage(&repo, &handler, &repo.join("policy.toml"), &out).unwrap();

    let mut zip = zip::ZipArchive::new(std::fs::File::open(&p.zip).unwrap()).unwrap();
    for i in 0..zip.len() {
        let f = zip.by_index(i).unwrap();
        let want = if f.name() == "handler" { 0o100755 } else { 0o100644 };
        assert_eq!(f.unix_mode(), Some(want), "{}: mode {:?}", f.name(), f.unix_mode().map(|m| format!("{m:o}")));
    }
    let unpacked = out.join("unpacked");
    deploychain::package::unpack(&p.zip, &unpacked).unwrap();
    let linkage = deploychain::package::linkage(&unpacked.join("handler")).unwrap();
    assert!(linkage.is_static(), "the shipped handler is dynamically linked: {linkage:?}");
    // The check can fail: a default (glibc) build names the loader and libc.
    let native = std::env::current_exe().unwrap().parent().and_then(Path::parent).unwrap().join("handler");
    if native.is_file() {
        let l = deploychain::package::linkage(&native).unwrap();
        assert!(!l.is_static() && l.interpreter.is_some() && l.needed.iter().any(|n| n.starts_with("libc.so")), "{l:?}");
    }
    // It runs: a bad configuration is refused with the setting named (nothing else is needed).
    let run = std::process::Command::new(unpacked.join("handler")).env_clear().output().unwrap();
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("APPROVAL_SIGNING_KEY"), "{}", String::from_utf8_lossy(&run.stderr));
    println!(
        "package: {} bytes zipped; handler {} bytes",
        std::fs::metadata(&p.zip).unwrap().len(),
        std::fs::metadata(p.dir.join("handler")).unwrap().len()
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// A zip whose `handler` has no executable bit (what a zip tool that writes no Unix modes makes)
/// does not start in the local stack, with the reason, as it would not start on Flex Consumption.
#[tokio::test]
async fn a_package_whose_handler_lost_its_executable_bit_does_not_start() {
    use std::io::Write;
    let native = std::env::current_exe().unwrap().parent().and_then(Path::parent).unwrap().join("handler");
    assert!(native.is_file(), "{} is built with the workspace's tests", native.display());
    let dir = std::env::temp_dir().join(format!("deploychain-package-noexec-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let good =
        deploychain::package::stage_with(&repo(), &native, &repo().join("policy.toml"), &dir, deploychain::package::Compression::Store)
            .unwrap();
    // The same files, written again with every entry 0644.
    let bad = dir.join("no-modes.zip");
    let mut src = zip::ZipArchive::new(std::fs::File::open(&good.zip).unwrap()).unwrap();
    let mut w = zip::ZipWriter::new(std::fs::File::create(&bad).unwrap());
    for i in 0..src.len() {
        let mut f = src.by_index(i).unwrap();
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).unwrap();
        let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored).unix_permissions(0o644);
        w.start_file(f.name(), options).unwrap();
        w.write_all(&bytes).unwrap();
    }
    w.finish().unwrap();
    let opts = deploychain::stack::StackOptions {
        repo: repo(),
        data_dir: dir.join("data"),
        policy: repo().join("policy.toml"),
        app: deploychain::stack::AppSource::Package(bad),
        http_port: 0,
        bus_port: 0,
        arm_port: 0,
        status_port: 0,
        sim: Default::default(),
        arm: Default::default(),
        watchdog: Default::default(),
        extra_settings: Vec::new(),
    };
    let err = match deploychain::stack::Stack::start(opts).await {
        Ok(stack) => {
            stack.discard().await;
            panic!("a handler without its executable bit started");
        }
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("not executable") && err.contains("mode 644"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
