//! What the suite and the demo need on the machine, checked before anything
//! is created, so that a missing piece fails in seconds with what to do,
//! not minutes later inside a cluster.
//!
//! kind nodes are containers: they share the host's kernel, so dm-clone,
//! device-mapper and loop devices must be in the *host's* kernel.

use std::path::Path;
use std::time::Duration;

use crate::cmd::{on_path, Tool};

/// The oldest kind tested (its node images run the Kubernetes 1.33 that
/// deploy/kind/cluster.yaml pins).
pub const MIN_KIND_VERSION: (u32, u32) = (0, 30);

/// The machine, as the checks see it (a fake one in the unit tests).
pub trait Probe {
    /// Whether `program` is on the PATH.
    fn has_program(&self, program: &str) -> bool;
    /// Runs `program args` and returns its stdout, or why it failed.
    fn run(&self, program: &str, args: &[&str]) -> Result<String, String>;
    /// A file's text, if it can be read.
    fn read(&self, path: &str) -> Option<String>;
    /// Whether a path exists.
    fn exists(&self, path: &str) -> bool;
}

/// The real machine.
pub struct HostProbe;

impl Probe for HostProbe {
    fn has_program(&self, program: &str) -> bool {
        on_path(program).is_some()
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<String, String> {
        Tool::new(program, Duration::from_secs(30))
            .args(args.iter().copied())
            .capture()
            .map(|out| out.stdout)
            .map_err(|e| e.to_string())
    }

    fn read(&self, path: &str) -> Option<String> {
        std::fs::read_to_string(path).ok()
    }

    fn exists(&self, path: &str) -> bool {
        Path::new(path).exists()
    }
}

/// Every problem found, each a sentence saying what to do. Empty: go.
pub fn check(probe: &dyn Probe) -> Vec<String> {
    let mut problems = Vec::new();
    if !cfg!(target_os = "linux") {
        problems.push(
            "the suite needs a Linux host: kind nodes use the host's kernel, which must have \
             dm-clone (Docker Desktop's VM kernel does not); see docs/E2E.md"
                .to_owned(),
        );
    }
    check_docker(probe, &mut problems);
    check_kind(probe, &mut problems);
    for (program, install) in [
        (
            "helm",
            "install Helm 3 (https://helm.sh/docs/intro/install/)",
        ),
        (
            "kubectl",
            "install kubectl (https://kubernetes.io/docs/tasks/tools/)",
        ),
    ] {
        if !probe.has_program(program) {
            problems.push(format!("`{program}` is not on the PATH: {install}"));
        }
    }
    problems.extend(check_kernel(probe));
    problems
}

fn check_docker(probe: &dyn Probe, problems: &mut Vec<String>) {
    if !probe.has_program("docker") {
        problems.push(
            "`docker` is not on the PATH: install Docker Engine (kind runs its nodes as Docker \
             containers)"
                .to_owned(),
        );
        return;
    }
    if let Err(why) = probe.run("docker", &["info", "--format", "{{.ServerVersion}}"]) {
        problems.push(format!(
            "the Docker engine does not answer (`docker info` failed): start it (e.g. `sudo \
             systemctl start docker`) and make sure this user may use it (the `docker` group); \
             {why}"
        ));
    }
}

fn check_kind(probe: &dyn Probe, problems: &mut Vec<String>) {
    let install = "install kind v0.30 or newer (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)";
    if !probe.has_program("kind") {
        problems.push(format!("`kind` is not on the PATH: {install}"));
        return;
    }
    match probe.run("kind", &["version"]) {
        Err(why) => problems.push(format!("`kind version` failed: {why}")),
        Ok(text) => match parse_kind_version(&text) {
            Some(version) if version >= MIN_KIND_VERSION => {}
            Some((major, minor)) => problems.push(format!(
                "kind v{major}.{minor} is too old for deploy/kind/cluster.yaml's node image: \
                 {install}"
            )),
            None => problems.push(format!(
                "cannot read kind's version from {:?}: {install}",
                text.trim()
            )),
        },
    }
}

/// `(major, minor)` of `kind version`'s output, e.g. `kind v0.30.0 go1.24.6
/// linux/amd64`.
pub fn parse_kind_version(text: &str) -> Option<(u32, u32)> {
    let word = text
        .split_whitespace()
        .find_map(|word| word.strip_prefix('v'))?;
    let mut parts = word.split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// How the host kernel provides a module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleState {
    /// Loaded now (`/sys/module/<name>`).
    Loaded,
    /// Built into the kernel (`modules.builtin`).
    BuiltIn,
    /// Available as a module file (`modules.dep`): the node plugin loads it
    /// with modprobe (kind mounts the host's /lib/modules into its nodes).
    Loadable,
    Missing,
}

/// Where `module` (as in `dm-clone`) stands on the host.
pub fn module_state(probe: &dyn Probe, module: &str) -> ModuleState {
    let sysfs_name = module.replace('-', "_");
    if probe.exists(&format!("/sys/module/{sysfs_name}")) {
        return ModuleState::Loaded;
    }
    let Some(release) = probe.read("/proc/sys/kernel/osrelease") else {
        return ModuleState::Missing;
    };
    let release = release.trim();
    let file = format!("/{module}.ko");
    let lists = |list: &str| {
        probe
            .read(&format!("/lib/modules/{release}/{list}"))
            .map(|text| {
                text.lines().any(|line| {
                    // `kernel/drivers/md/dm-clone.ko[.xz|.zst]: deps...` or a
                    // bare path in modules.builtin.
                    let path = line.split(':').next().unwrap_or_default();
                    let path = path.trim();
                    path.ends_with(&file) || path.contains(&format!("{file}."))
                })
            })
            .unwrap_or(false)
    };
    if lists("modules.builtin") {
        ModuleState::BuiltIn
    } else if lists("modules.dep") {
        ModuleState::Loadable
    } else {
        ModuleState::Missing
    }
}

/// dm-clone, device-mapper and loop devices in the host kernel.
pub fn check_kernel(probe: &dyn Probe) -> Vec<String> {
    let mut problems = Vec::new();
    let release = probe
        .read("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    if module_state(probe, "dm-clone") == ModuleState::Missing {
        problems.push(format!(
            "the host kernel ({release}) has no dm-clone: it is neither loaded \
             (/sys/module/dm_clone) nor built in nor a module in /lib/modules/{release}. kind \
             nodes share the host's kernel, so the host needs it: Fedora, Arch and Ubuntu \
             kernels have it (`sudo modprobe dm-clone`); Debian and RHEL need the module built, \
             see docs/DM-CLONE.md"
        ));
    }
    let misc = probe.read("/proc/misc").unwrap_or_default();
    let in_misc = |name: &str| {
        misc.lines()
            .any(|l| l.split_whitespace().nth(1) == Some(name))
    };
    if !in_misc("device-mapper") && module_state(probe, "dm-mod") == ModuleState::Missing {
        problems.push(format!(
            "the host kernel ({release}) has no device-mapper (not in /proc/misc, no dm-mod \
             module): install your distribution's full kernel, or `sudo modprobe dm-mod`"
        ));
    }
    if !in_misc("loop-control") && module_state(probe, "loop") == ModuleState::Missing {
        problems.push(format!(
            "the host kernel ({release}) has no loop devices (no loop-control in /proc/misc, \
             no loop module): the file pool attaches its volumes as loop devices; `sudo \
             modprobe loop`"
        ));
    }
    problems
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    /// A machine described by its programs, command outputs and files.
    #[derive(Default)]
    struct FakeHost {
        programs: BTreeSet<&'static str>,
        failing: BTreeSet<&'static str>,
        outputs: BTreeMap<&'static str, &'static str>,
        files: BTreeMap<String, String>,
    }

    impl Probe for FakeHost {
        fn has_program(&self, program: &str) -> bool {
            self.programs.contains(program)
        }
        fn run(&self, program: &str, _args: &[&str]) -> Result<String, String> {
            if self.failing.contains(program) {
                return Err(format!("{program}: Cannot connect"));
            }
            Ok(self.outputs.get(program).copied().unwrap_or("").to_owned())
        }
        fn read(&self, path: &str) -> Option<String> {
            self.files.get(path).cloned()
        }
        fn exists(&self, path: &str) -> bool {
            self.files.contains_key(path)
        }
    }

    const RELEASE: &str = "6.12.9-200.fc41.x86_64";

    fn ready_host() -> FakeHost {
        let mut host = FakeHost {
            programs: ["docker", "kind", "helm", "kubectl"].into_iter().collect(),
            ..FakeHost::default()
        };
        host.outputs
            .insert("kind", "kind v0.30.0 go1.24.6 linux/amd64\n");
        host.outputs.insert("docker", "28.3.3\n");
        host.files
            .insert("/proc/sys/kernel/osrelease".into(), format!("{RELEASE}\n"));
        host.files.insert(
            "/proc/misc".into(),
            "236 device-mapper\n237 loop-control\n".into(),
        );
        host.files
            .insert("/sys/module/dm_clone".into(), String::new());
        host
    }

    #[test]
    fn a_ready_host_passes() {
        assert_eq!(check(&ready_host()), Vec::<String>::new());
    }

    #[test]
    fn each_missing_tool_is_named_with_what_to_do() {
        let mut host = ready_host();
        host.programs.clear();
        let problems = check(&host).join("\n");
        for expected in [
            "`docker` is not on the PATH: install Docker Engine",
            "`kind` is not on the PATH: install kind v0.30",
            "`helm` is not on the PATH",
            "`kubectl` is not on the PATH",
        ] {
            assert!(
                problems.contains(expected),
                "{expected:?} not in:\n{problems}"
            );
        }
    }

    #[test]
    fn a_stopped_docker_engine_is_told_apart_from_a_missing_cli() {
        let mut host = ready_host();
        host.failing.insert("docker");
        let problems = check(&host);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("the Docker engine does not answer"));
        assert!(problems[0].contains("Cannot connect"));
    }

    #[test]
    fn an_old_kind_is_refused() {
        let mut host = ready_host();
        host.outputs
            .insert("kind", "kind v0.20.0 go1.20.4 linux/amd64");
        let problems = check(&host);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("kind v0.20 is too old"),
            "{problems:?}"
        );
    }

    #[test]
    fn kind_versions_parse() {
        assert_eq!(
            parse_kind_version("kind v0.30.0 go1.24.6 linux/amd64"),
            Some((0, 30))
        );
        assert_eq!(
            parse_kind_version("kind v0.31.0-alpha+abc go1.25"),
            Some((0, 31))
        );
        assert_eq!(parse_kind_version("kind version unknown"), None);
    }

    #[test]
    fn no_dm_clone_points_to_the_docs() {
        let mut host = ready_host();
        host.files.remove("/sys/module/dm_clone");
        let problems = check(&host);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains(&format!("the host kernel ({RELEASE}) has no dm-clone")));
        assert!(problems[0].contains("docs/DM-CLONE.md"));
    }

    #[test]
    fn dm_clone_as_a_module_file_or_built_in_is_enough() {
        let mut host = ready_host();
        host.files.remove("/sys/module/dm_clone");
        host.files.insert(
            format!("/lib/modules/{RELEASE}/modules.dep"),
            "kernel/drivers/md/dm-clone.ko.xz: kernel/drivers/md/dm-bio-prison.ko.xz\n".into(),
        );
        assert_eq!(module_state(&host, "dm-clone"), ModuleState::Loadable);
        assert!(check(&host).is_empty());

        host.files
            .remove(&format!("/lib/modules/{RELEASE}/modules.dep"));
        host.files.insert(
            format!("/lib/modules/{RELEASE}/modules.builtin"),
            "kernel/drivers/md/dm-mod.ko\nkernel/drivers/md/dm-clone.ko\n".into(),
        );
        assert_eq!(module_state(&host, "dm-clone"), ModuleState::BuiltIn);
    }

    #[test]
    fn a_similar_module_name_is_not_dm_clone() {
        let mut host = ready_host();
        host.files.remove("/sys/module/dm_clone");
        host.files.insert(
            format!("/lib/modules/{RELEASE}/modules.dep"),
            "kernel/drivers/md/dm-clone-extra.ko: \nkernel/drivers/md/xdm-clone.ko.zst:\n".into(),
        );
        // `xdm-clone.ko` ends with "/xdm-clone.ko", not "/dm-clone.ko".
        assert_eq!(module_state(&host, "dm-clone"), ModuleState::Missing);
    }

    #[test]
    fn no_device_mapper_or_loop_is_reported() {
        let mut host = ready_host();
        host.files.insert("/proc/misc".into(), "1 psaux\n".into());
        let problems = check(&host).join("\n");
        assert!(problems.contains("has no device-mapper"), "{problems}");
        assert!(problems.contains("has no loop devices"), "{problems}");
    }
}
