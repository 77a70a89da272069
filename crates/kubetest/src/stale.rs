//! Folders of servers whose test process was killed before it could clean
//! up (the daemons die with it, the folder stays): each folder names its
//! owner, and the next start removes those whose owner is gone.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

/// The prefix of every server folder in the temporary directory.
pub(crate) const DIR_PREFIX: &str = "kubetest-";
const OWNER_FILE: &str = "owner";

/// A process's start time in clock ticks since boot (field 22 of
/// /proc/PID/stat), which tells a live owner from a recycled PID.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count
    // from the last ')'. Field 3 (state) is then the first.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Records this process as the owner of `dir`.
pub(crate) fn mark_owner(dir: &Path) -> Result<()> {
    let pid = std::process::id();
    let start = start_time(pid).context("reading this process's start time")?;
    let path = dir.join(OWNER_FILE);
    fs::write(&path, format!("{pid} {start}\n"))
        .with_context(|| format!("writing {}", path.display()))
}

fn owner_alive(owner: &str) -> bool {
    let mut fields = owner.split_whitespace();
    let (Some(pid), Some(start)) = (fields.next(), fields.next()) else {
        // Unreadable: being written right now, or not ours to judge.
        return true;
    };
    match (pid.parse::<u32>(), start.parse::<u64>()) {
        (Ok(pid), Ok(start)) => start_time(pid) == Some(start),
        _ => true,
    }
}

/// Removes the server folders in `tmp` whose owner has ended. Folders
/// without an owner file (kept on purpose, or just being created) stay.
/// Best effort: failures are ignored.
pub(crate) fn sweep(tmp: &Path) {
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let is_ours = name.to_str().is_some_and(|n| n.starts_with(DIR_PREFIX));
        if !is_ours || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let dir = entry.path();
        let Ok(owner) = fs::read_to_string(dir.join(OWNER_FILE)) else {
            continue;
        };
        if !owner_alive(&owner) {
            eprintln!(
                "kubetest: removing {} (its test process is gone)",
                dir.display()
            );
            let _ = fs::remove_dir_all(&dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_only_folders_of_dead_owners() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let live = tmp.path().join("kubetest-live");
        let dead = tmp.path().join("kubetest-dead");
        let kept = tmp.path().join("kubetest-kept");
        let other = tmp.path().join("other-dead");
        for dir in [&live, &dead, &kept, &other] {
            fs::create_dir(dir).expect("mkdir");
        }
        mark_owner(&live).expect("mark live");
        // PID 1 is alive, but not the process that started at that tick.
        let recycled = format!("1 {}\n", u64::MAX);
        fs::write(dead.join(OWNER_FILE), &recycled).expect("write owner");
        fs::write(other.join(OWNER_FILE), &recycled).expect("write owner");
        sweep(tmp.path());
        assert!(live.exists());
        assert!(!dead.exists());
        assert!(kept.exists());
        assert!(other.exists());
    }
}
