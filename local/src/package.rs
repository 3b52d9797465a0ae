//! `deploychain package`: the function app as the Functions host expects it — `host.json` at the
//! root, one folder per function with its `function.json`, the `handler` executable (mode 755) and
//! the pipeline policy — staged in a folder and zipped for `azd deploy` / zip deploy (Flex
//! Consumption one-deploy). The layout is checked before anything is written: every function the
//! handler serves has its folder and every folder is a function it serves, and `host.json` starts
//! the `handler` it ships.

use anyhow::{Context, Result, anyhow, bail};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What was staged.
#[derive(Debug)]
pub struct Package {
    pub dir: PathBuf,
    pub zip: PathBuf,
    /// Paths inside the package, sorted.
    pub files: Vec<String>,
}

/// The functions `functions/` declares (folders holding a `function.json`).
fn function_folders(repo: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(repo.join("functions")).context("reading functions/")? {
        let dir = e?.path();
        if dir.join("function.json").is_file() {
            out.push(dir.file_name().and_then(|n| n.to_str()).ok_or_else(|| anyhow!("bad folder name"))?.to_string());
        }
    }
    out.sort();
    Ok(out)
}

/// Check the app's layout against what the handler serves.
pub fn check_layout(repo: &Path) -> Result<()> {
    let folders = function_folders(repo)?;
    let mut served: Vec<String> = deploychain_functions::FUNCTIONS.iter().map(|(n, _)| n.to_string()).collect();
    served.sort();
    if folders != served {
        bail!("functions/ declares {folders:?} but the handler serves {served:?}");
    }
    let host: serde_json::Value = serde_json::from_slice(&std::fs::read(repo.join("host.json")).context("reading host.json")?)?;
    let exe = host["customHandler"]["description"]["defaultExecutablePath"].as_str().unwrap_or_default();
    if exe != "handler" {
        bail!("host.json starts `{exe}`, but the package ships `handler`");
    }
    Ok(())
}

/// Stage the app from `repo` with the `handler` executable and `policy` into `out` (a folder
/// `functionapp` and `functionapp.zip` beside it).
pub fn stage(repo: &Path, handler: &Path, policy: &Path, out: &Path) -> Result<Package> {
    check_layout(repo)?;
    deploychain_functions::policy::Policy::from_toml(
        &std::fs::read_to_string(policy).with_context(|| format!("reading {}", policy.display()))?,
    )
    .map_err(|e| anyhow!("{e} ({})", policy.display()))?;
    if !handler.is_file() {
        bail!("the handler {} does not exist", handler.display());
    }
    let dir = out.join("functionapp");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let mut files: Vec<(String, PathBuf, u32)> = vec![
        ("host.json".into(), repo.join("host.json"), 0o644),
        ("policy.toml".into(), policy.to_path_buf(), 0o644),
        ("handler".into(), handler.to_path_buf(), 0o755),
    ];
    for f in function_folders(repo)? {
        files.push((format!("{f}/function.json"), repo.join("functions").join(&f).join("function.json"), 0o644));
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let zip_path = out.join("functionapp.zip");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&zip_path).with_context(|| format!("creating {}", zip_path.display()))?);
    for (name, src, mode) in &files {
        let bytes = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
        let dest = dir.join(name);
        if let Some(p) = dest.parent() {
            std::fs::create_dir_all(p)?;
        }
        std::fs::write(&dest, &bytes)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(*mode))?;
        }
        let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated).unix_permissions(*mode);
        zip.start_file(name.as_str(), options)?;
        zip.write_all(&bytes)?;
    }
    zip.finish()?;
    Ok(Package { dir, zip: zip_path, files: files.into_iter().map(|f| f.0).collect() })
}

/// Build the release handler for linux-x64 (cross-compiling when this is another platform).
pub fn build_handler(repo: &Path) -> Result<PathBuf> {
    let native = cfg!(all(target_os = "linux", target_arch = "x86_64"));
    let mut cmd = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(repo).args(["build", "--release", "-p", "deploychain-functions", "--bin", "handler"]);
    if !native {
        cmd.args(["--target", "x86_64-unknown-linux-gnu"]);
    }
    let status = cmd.status().context("running cargo")?;
    if !status.success() {
        bail!("cargo build of the handler failed ({status})");
    }
    let sub = if native { "release" } else { "x86_64-unknown-linux-gnu/release" };
    Ok(repo.join("target").join(sub).join("handler"))
}
