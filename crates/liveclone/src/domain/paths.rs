//! Checks on paths the CO gives (staging and target paths).
//!
//! The driver mounts, creates and removes things at these paths as root, so
//! each must be a plain absolute path under one of the configured roots
//! (kubelet's folder by default), and its parent must resolve, through any
//! symlinks, to a folder under the same root.

use std::path::{Component, Path, PathBuf};

use crate::domain::error::{DomainError, DomainResult};

#[derive(Debug, Clone)]
pub struct AllowedRoots {
    roots: Vec<PathBuf>,
}

impl AllowedRoots {
    /// Roots are resolved now, so a symlinked root (e.g. `/tmp` on some
    /// systems) compares with resolved parents later. Roots that do not
    /// exist yet are kept as given.
    pub fn new(roots: impl IntoIterator<Item = PathBuf>) -> Self {
        let roots = roots
            .into_iter()
            .map(|root| root.canonicalize().unwrap_or(root))
            .collect();
        Self { roots }
    }

    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// Returns the path if it is acceptable; INVALID_ARGUMENT otherwise.
    pub fn check(&self, what: &str, path: &str) -> DomainResult<PathBuf> {
        let invalid = |why: &str| DomainError::invalid_argument(format!("{what} {path:?} {why}"));
        if path.is_empty() {
            return Err(DomainError::invalid_argument(format!("{what} is missing")));
        }
        if path.contains('\0') {
            return Err(invalid("contains a NUL byte"));
        }
        let candidate = Path::new(path);
        if !candidate.is_absolute() {
            return Err(invalid("is not absolute"));
        }
        if candidate
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        {
            return Err(invalid("contains `.` or `..`"));
        }
        let under = |p: &Path| {
            self.roots
                .iter()
                .any(|root| p.starts_with(root) && p != root)
        };
        if !under(candidate) {
            return Err(invalid(&format!(
                "is outside the allowed folders ({})",
                self.describe()
            )));
        }
        if let Some(parent) = candidate.parent() {
            if let Ok(resolved) = parent.canonicalize() {
                let resolved_ok = self.roots.iter().any(|root| resolved.starts_with(root));
                if !resolved_ok {
                    return Err(invalid(&format!(
                        "resolves through a symlink to {} outside the allowed folders",
                        resolved.display()
                    )));
                }
            }
        }
        Ok(candidate.to_path_buf())
    }

    fn describe(&self) -> String {
        self.roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_paths_under_a_root_and_refuses_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("resolve");
        let roots = AllowedRoots::new([root.clone()]);
        let inside = root.join("pods/x/mount");
        let inside = inside.to_str().expect("utf-8");
        assert!(roots.check("target path", inside).is_ok());
        for bad in ["", "relative/x", "/etc/passwd", "/"] {
            assert!(roots.check("target path", bad).is_err(), "{bad}");
        }
        let dotdot = format!("{}/../etc", root.display());
        assert!(roots.check("target path", &dotdot).is_err());
        assert!(roots
            .check("target path", root.to_str().expect("utf-8"))
            .is_err());
    }

    #[test]
    fn refuses_a_symlinked_parent_that_leaves_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("resolve");
        std::os::unix::fs::symlink(outside.path(), root.join("escape")).expect("symlink");
        let roots = AllowedRoots::new([root.clone()]);
        let path = root.join("escape/target");
        let err = roots
            .check("target path", path.to_str().expect("utf-8"))
            .expect_err("escapes");
        assert!(err.message.contains("symlink"), "{}", err.message);
    }
}
