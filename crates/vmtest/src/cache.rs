//! Where `tests/vm/prepare.sh` left the kernel, its modules and the initramfs.
//!
//! The script owns building; this module only finds and checks its output, so
//! the layout is described once, in the script's header.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Environment variable naming the cache root (same as in prepare.sh).
pub const CACHE_ENV: &str = "LIVECLONE_VM_CACHE";

/// A kernel prepared for the test VM.
#[derive(Debug, Clone)]
pub struct PreparedKernel {
    pub dir: PathBuf,
    /// Kernel ABI name, the `uname -r` of the guest (e.g. `6.1.0-56-amd64`).
    pub abi: String,
    /// Debian package version the image, headers and source were taken from.
    pub package_version: String,
}

impl PreparedKernel {
    /// The cache root: `$LIVECLONE_VM_CACHE`, else `$XDG_CACHE_HOME/liveclone/vm`,
    /// else `~/.cache/liveclone/vm`, else (no HOME) `/var/cache/liveclone/vm`;
    /// the same order as tests/vm/prepare.sh.
    pub fn cache_root() -> Result<PathBuf> {
        if let Some(dir) = std::env::var_os(CACHE_ENV) {
            return Ok(PathBuf::from(dir));
        }
        if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
            return Ok(PathBuf::from(dir).join("liveclone/vm"));
        }
        let home =
            std::env::var_os("HOME").context("neither LIVECLONE_VM_CACHE nor HOME is set")?;
        Ok(PathBuf::from(home).join(".cache/liveclone/vm"))
    }

    /// The entry that prepare.sh made last.
    pub fn locate() -> Result<Self> {
        let root = Self::cache_root()?;
        let current = root.join("current");
        let key = std::fs::read_to_string(&current).with_context(|| {
            format!(
                "no prepared kernel at {} (run tests/vm/prepare.sh, or `make vm-prepare`)",
                current.display()
            )
        })?;
        Self::open(&root.join(key.trim()))
    }

    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.join(".complete").is_file() {
            bail!("{} is not a complete kernel cache entry", dir.display());
        }
        let env = std::fs::read_to_string(dir.join("kernel.env"))
            .with_context(|| format!("reading {}/kernel.env", dir.display()))?;
        let field = |name: &str| -> Result<String> {
            env.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
                .map(str::to_owned)
                .with_context(|| format!("{name} missing from {}/kernel.env", dir.display()))
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            abi: field("KERNEL_ABI")?,
            package_version: field("KERNEL_PACKAGE_VERSION")?,
        })
    }

    pub fn vmlinuz(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }

    pub fn initramfs(&self) -> PathBuf {
        self.dir.join("initramfs.cpio.gz")
    }

    /// `/lib/modules/<abi>` of the guest, with `updates/dm-clone.ko` and a
    /// current `modules.dep`.
    pub fn modules_dir(&self) -> PathBuf {
        self.dir.join("modroot/lib/modules").join(&self.abi)
    }

    /// Scratch space for runs; each run makes and removes its own folder.
    pub fn runs_dir(&self) -> Result<PathBuf> {
        Ok(Self::cache_root()?.join("runs"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_complete_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("kernel.env"),
            "KERNEL_ABI=6.1.0-56-amd64\nKERNEL_PACKAGE_VERSION=6.1.192-2\n",
        )
        .expect("write");
        assert!(
            PreparedKernel::open(dir.path()).is_err(),
            "no .complete stamp yet"
        );
        std::fs::write(dir.path().join(".complete"), "").expect("write");
        let kernel = PreparedKernel::open(dir.path()).expect("open");
        assert_eq!(kernel.abi, "6.1.0-56-amd64");
        assert_eq!(kernel.package_version, "6.1.192-2");
        assert!(kernel
            .modules_dir()
            .ends_with("modroot/lib/modules/6.1.0-56-amd64"));
    }

    #[test]
    fn rejects_an_entry_without_its_fields() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(".complete"), "").expect("write");
        std::fs::write(dir.path().join("kernel.env"), "KERNEL_ABI=6.1.0-56-amd64\n")
            .expect("write");
        let err = PreparedKernel::open(dir.path()).expect_err("missing version");
        assert!(format!("{err:#}").contains("KERNEL_PACKAGE_VERSION"));
    }
}
