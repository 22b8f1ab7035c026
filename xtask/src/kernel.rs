//! The guest kernel: Debian's linux-source-6.12 + kernel-config/uvm.config +
//! kernel-config/patches/, built once per (source version, config, patches)
//! and cached outside the clone so every checkout on the machine reuses it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::{apt_install, guest_dir, root, run};

const SOURCE_PACKAGE: &str = "linux-source-6.12";
const BUILD_PACKAGES: &[&str] = &[
    "linux-source-6.12",
    "bc",
    "flex",
    "bison",
    "libelf-dev",
    "libssl-dev",
    "make",
    "gcc",
    "xz-utils",
    "patch",
];
const ARTIFACTS: [(&str, &str); 3] = [
    ("vmlinux", "vmlinux"),
    ("arch/x86/boot/bzImage", "bzImage"),
    (".config", "config"),
];

/// Builds (or reuses) the kernel and exposes it in target/guest/.
pub fn build() -> Result<PathBuf> {
    apt_install(BUILD_PACKAGES)?;
    let config_dir = root().join("kernel-config");
    let config = fs::read_to_string(config_dir.join("uvm.config"))?;
    let patches = patches(&config_dir)?;
    let key = cache_key(&source_version()?, &config, &patches)?;
    let cached = cache_dir()?.join(&key);
    if !cached.join("complete").exists() {
        eprintln!("xtask: building kernel {key} (a few minutes, once per config)");
        compile(&cached, &config_dir, &patches)?;
    }
    let out = guest_dir()?;
    for (_, name) in ARTIFACTS {
        fs::copy(cached.join(name), out.join(name))
            .with_context(|| format!("copying {name} from {}", cached.display()))?;
    }
    eprintln!("xtask: kernel at {}", out.join("vmlinux").display());
    Ok(out)
}

/// Where built kernels are kept.
fn cache_dir() -> Result<PathBuf> {
    Ok(cache_root()?.join("kernel"))
}

/// `$UVM_CACHE`, else `$XDG_CACHE_HOME/uvm`, else `~/.cache/uvm`: outside
/// the clone, shared by every clone on the machine.
pub fn cache_root() -> Result<PathBuf> {
    let dir = match (
        std::env::var_os("UVM_CACHE"),
        std::env::var_os("XDG_CACHE_HOME"),
    ) {
        (Some(dir), _) => PathBuf::from(dir),
        (None, Some(xdg)) => PathBuf::from(xdg).join("uvm"),
        (None, None) => {
            PathBuf::from(std::env::var("HOME").context("HOME unset")?).join(".cache/uvm")
        }
    };
    Ok(dir)
}

fn source_version() -> Result<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", SOURCE_PACKAGE])
        .output()
        .context("dpkg-query")?;
    let version = String::from_utf8(out.stdout)?;
    if version.is_empty() {
        bail!("{SOURCE_PACKAGE} is not installed");
    }
    Ok(version)
}

fn patches(config_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut patches: Vec<PathBuf> = fs::read_dir(config_dir.join("patches"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    patches.retain(|p| p.extension().is_some_and(|e| e == "patch"));
    patches.sort();
    Ok(patches)
}

fn cache_key(version: &str, config: &str, patches: &[PathBuf]) -> Result<String> {
    let mut hash = Sha256::new();
    hash.update(version);
    hash.update(config);
    for patch in patches {
        hash.update(fs::read(patch)?);
    }
    let digest = hash.finalize();
    Ok(format!(
        "{SOURCE_PACKAGE}-{version}-{}",
        &hex(&digest)[..16]
    ))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Unpacks, patches, configures and builds into `dest` (then drops the tree).
fn compile(dest: &Path, config_dir: &Path, patches: &[PathBuf]) -> Result<()> {
    let work = PathBuf::from(format!("{}.build", dest.display()));
    if work.exists() {
        fs::remove_dir_all(&work)?;
    }
    fs::create_dir_all(&work)?;
    let tarball = format!("/usr/src/{SOURCE_PACKAGE}.tar.xz");
    run(Command::new("tar").args(["xf", &tarball, "-C"]).arg(&work))?;
    let src = work.join(SOURCE_PACKAGE);
    for patch in patches {
        run(Command::new("patch")
            .args(["-p1", "-s", "-d"])
            .arg(&src)
            .arg("-i")
            .arg(patch))?;
    }
    let config = config_dir.join("uvm.config");
    run(Command::new("make")
        .arg("-C")
        .arg(&src)
        .arg(format!("KCONFIG_ALLCONFIG={}", config.display()))
        .arg("allnoconfig"))?;
    verify(
        &fs::read_to_string(&config)?,
        &fs::read_to_string(src.join(".config"))?,
    )?;
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    run(Command::new("make")
        .arg("-C")
        .arg(&src)
        .arg(format!("-j{jobs}"))
        .args(["vmlinux", "bzImage"]))?;
    fs::create_dir_all(dest)?;
    for (from, name) in ARTIFACTS {
        fs::copy(src.join(from), dest.join(name)).with_context(|| format!("copying {from}"))?;
    }
    fs::write(dest.join("complete"), "")?;
    fs::remove_dir_all(&work)?;
    Ok(())
}

/// Every `CONFIG_X=v` of our config must be in the result, and every
/// `# CONFIG_X is not set` must be absent; names every option that is not.
fn verify(wanted: &str, result: &str) -> Result<()> {
    let set: std::collections::HashSet<&str> = result.lines().collect();
    let mut wrong = Vec::new();
    for line in wanted.lines() {
        if line.starts_with("CONFIG_") && !set.contains(line) {
            wrong.push(format!("{line} (missing)"));
        } else if let Some(name) = line
            .strip_prefix("# ")
            .and_then(|l| l.strip_suffix(" is not set"))
        {
            let prefix = format!("{name}=");
            if result.lines().any(|l| l.starts_with(&prefix)) {
                wrong.push(format!("{name} (must be off)"));
            }
        }
    }
    if !wrong.is_empty() {
        bail!("kernel config does not hold: {}", wrong.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_names_missing_and_forbidden_options() {
        let wanted = "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n# comment\n";
        assert!(verify(wanted, "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n").is_ok());
        let err = verify(wanted, "CONFIG_A=y\nCONFIG_C=y\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("CONFIG_B=y (missing)"), "{err}");
        assert!(err.contains("CONFIG_C (must be off)"), "{err}");
        assert!(!err.contains("CONFIG_A"), "{err}");
    }

    #[test]
    fn cache_key_changes_with_config() {
        let a = cache_key("1", "CONFIG_A=y", &[]).unwrap();
        assert_ne!(a, cache_key("1", "CONFIG_B=y", &[]).unwrap());
        assert_ne!(a, cache_key("2", "CONFIG_A=y", &[]).unwrap());
        assert_eq!(a, cache_key("1", "CONFIG_A=y", &[]).unwrap());
    }
}
