//! `deploychain package`: the function app as the Functions host expects it — `host.json` at the
//! root, one folder per function with its `function.json`, the `handler` executable and the
//! pipeline policy — staged in a folder and zipped for `azd deploy` / zip deploy (Flex
//! Consumption one-deploy). The layout is checked before anything is written: every function the
//! handler serves has its folder and every folder is a function it serves, and `host.json` starts
//! the `handler` it ships.
//!
//! The shipped `handler` is a static musl binary (decision 0022): it needs nothing from the worker
//! it lands on, whatever that image's glibc or OpenSSL. Its mode in the zip is 0755: Flex
//! Consumption runs the package from a read-only mount, so the bit must be in the zip itself (the
//! host's own chmod fails there; microsoft/vscode-azurefunctions#4497). `deploychain up` runs the
//! chain from this same zip, unpacked with the modes it holds ([`unpack`]).

use anyhow::{Context, Result, anyhow, bail};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The target the shipped handler is built for.
pub const TARGET: &str = "x86_64-unknown-linux-musl";

/// What was staged.
#[derive(Debug)]
pub struct Package {
    pub dir: PathBuf,
    pub zip: PathBuf,
    /// Paths inside the package, sorted.
    pub files: Vec<String>,
}

/// How the zip's entries are stored: deflated for what is deployed; stored as they are for the
/// packages tests make of a debug handler on every stack start (same layout and modes, no CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Deflate,
    Store,
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
/// `functionapp` and `functionapp.zip` beside it), deflated.
pub fn stage(repo: &Path, handler: &Path, policy: &Path, out: &Path) -> Result<Package> {
    stage_with(repo, handler, policy, out, Compression::Deflate)
}

/// [`stage`], choosing how the zip stores its entries.
pub fn stage_with(repo: &Path, handler: &Path, policy: &Path, out: &Path, compression: Compression) -> Result<Package> {
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
    let method = match compression {
        Compression::Deflate => zip::CompressionMethod::Deflated,
        Compression::Store => zip::CompressionMethod::Stored,
    };
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(
        std::fs::File::create(&zip_path).with_context(|| format!("creating {}", zip_path.display()))?,
    ));
    for (name, src, mode) in &files {
        let bytes = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
        let dest = dir.join(name);
        if let Some(p) = dest.parent() {
            std::fs::create_dir_all(p)?;
        }
        std::fs::write(&dest, &bytes)?;
        set_mode(&dest, *mode)?;
        // Unix modes in the external attributes (S_IFREG | mode; "made by" Unix), as Core Tools
        // writes them for a custom handler.
        let options = zip::write::SimpleFileOptions::default().compression_method(method).unix_permissions(*mode).large_file(false);
        zip.start_file(name.as_str(), options)?;
        zip.write_all(&bytes)?;
    }
    zip.finish()?.flush()?;
    Ok(Package { dir, zip: zip_path, files: files.into_iter().map(|f| f.0).collect() })
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
}

/// Unpack a package zip into `dest` (emptied first) as the platform lays it out for the host: every
/// file with the mode its zip entry records, and no other. An entry with no Unix mode (a zip
/// written by a tool that records none) gets 0644, so a `handler` that lost its executable bit
/// fails to start here as it does on Flex Consumption.
pub fn unpack(zip_path: &Path, dest: &Path) -> Result<Vec<String>> {
    let file = std::fs::File::open(zip_path).with_context(|| format!("opening {}", zip_path.display()))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).with_context(|| format!("{} is not a zip", zip_path.display()))?;
    if dest.exists() {
        std::fs::remove_dir_all(dest).with_context(|| format!("clearing {}", dest.display()))?;
    }
    std::fs::create_dir_all(dest)?;
    let mut names = Vec::new();
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i)?;
        // Only plain relative paths inside dest (enclosed_name refuses `..` and absolute names).
        let rel = entry.enclosed_name().ok_or_else(|| anyhow!("{}: entry `{}` escapes the package", zip_path.display(), entry.name()))?;
        let path = dest.join(&rel);
        if entry.is_dir() {
            std::fs::create_dir_all(&path)?;
            continue;
        }
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p)?;
        }
        let mut out = std::io::BufWriter::new(std::fs::File::create(&path).with_context(|| format!("writing {}", path.display()))?);
        std::io::copy(&mut entry, &mut out)?;
        out.flush()?;
        set_mode(&path, entry.unix_mode().map(|m| m & 0o777).unwrap_or(0o644))?;
        names.push(entry.name().to_string());
    }
    names.sort();
    Ok(names)
}

/// How an executable is linked, read from its ELF headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Linkage {
    /// The program interpreter (`PT_INTERP`, e.g. `/lib64/ld-linux-x86-64.so.2`): a dynamically
    /// linked executable names one.
    pub interpreter: Option<String>,
    /// The shared libraries it needs (`DT_NEEDED`).
    pub needed: Vec<String>,
}

impl Linkage {
    pub fn is_static(&self) -> bool {
        self.interpreter.is_none() && self.needed.is_empty()
    }
}

/// Read `path`'s linkage.
pub fn linkage(path: &Path) -> Result<Linkage> {
    use object::elf;
    use object::read::elf::{Dyn, ElfFile64, FileHeader, ProgramHeader, SectionHeader};
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file =
        ElfFile64::<object::Endianness>::parse(&*data).with_context(|| format!("{} is not a 64-bit ELF executable", path.display()))?;
    let endian = file.endian();
    let mut interpreter = None;
    let mut needed = Vec::new();
    for ph in file.elf_program_headers() {
        if ph.p_type(endian) == elf::PT_INTERP {
            let bytes = ph.data(endian, &*data).map_err(|()| anyhow!("{}: bad PT_INTERP", path.display()))?;
            interpreter = Some(String::from_utf8_lossy(bytes).trim_end_matches('\0').to_string());
        }
    }
    let header = file.elf_header();
    let sections = header.sections(endian, &*data)?;
    for (index, section) in sections.iter().enumerate() {
        if let Some((entries, link)) = section.dynamic(endian, &*data)? {
            let strings = sections.strings(endian, &*data, link)?;
            for d in entries {
                if d.d_tag(endian) == elf::DT_NEEDED {
                    let name =
                        d.string(endian, strings).with_context(|| format!("{}: bad DT_NEEDED in section {index}", path.display()))?;
                    needed.push(String::from_utf8_lossy(name).into_owned());
                }
            }
        }
    }
    Ok(Linkage { interpreter, needed })
}

/// Build the release handler for Flex Consumption: x86_64 Linux, statically linked against musl
/// with OpenSSL built in. Installs what the build needs first when it is missing (the target's
/// standard library through rustup, Debian's musl-tools for the C code: `scripts/install-musl.sh`),
/// and refuses a result that is not static.
pub fn build_handler(repo: &Path) -> Result<PathBuf> {
    ensure_musl(repo)?;
    let mut cmd = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(repo).args(["build", "--release", "--target", TARGET, "-p", "deploychain-functions", "--bin", "handler"]);
    eprintln!("building the handler (release, {TARGET}, static) …");
    let status = cmd.status().context("running cargo")?;
    if !status.success() {
        bail!("cargo build of the handler failed ({status})");
    }
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| repo.join("target"));
    let handler = target.join(TARGET).join("release").join("handler");
    let l = linkage(&handler)?;
    if !l.is_static() {
        bail!("{} is not statically linked (interpreter {:?}, needs {:?})", handler.display(), l.interpreter, l.needed);
    }
    Ok(handler)
}

/// The musl target and a C compiler for it (`musl-gcc`), installed by `scripts/install-musl.sh`
/// when either is missing.
fn ensure_musl(repo: &Path) -> Result<()> {
    let has_target = std::process::Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.trim() == TARGET))
        // Without rustup the toolchain's own sysroot decides; cargo's error will say.
        .unwrap_or(true);
    let has_cc = std::process::Command::new("musl-gcc").arg("--version").output().is_ok_and(|o| o.status.success());
    if has_target && has_cc {
        return Ok(());
    }
    eprintln!("installing what a static handler build needs (scripts/install-musl.sh) …");
    let status = std::process::Command::new("bash")
        .arg(repo.join("scripts/install-musl.sh"))
        .current_dir(repo)
        .status()
        .context("running scripts/install-musl.sh")?;
    if !status.success() {
        bail!(
            "scripts/install-musl.sh failed ({status}): the handler needs the {TARGET} target (rustup) and musl-gcc (Debian's musl-tools)"
        );
    }
    Ok(())
}
