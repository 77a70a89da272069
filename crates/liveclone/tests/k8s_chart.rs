//! The Helm chart `charts/liveclone` against helm and a real kube-apiserver:
//! `helm lint --strict`; renders of several value sets, each applied with
//! `kubectl apply --server-side --dry-run=server` (so the API server's own
//! validation and defaulting judge every object, the ServiceMonitor against
//! prometheus-operator's CRD); value sets the schema or the templates must
//! refuse, with their messages; the snapshot class's `auto`; the invariants
//! that matter for safety (who is privileged, which host folders are mounted
//! and how, pinned images); and that `deploy/rbac/*.yaml` are the chart's
//! render with default values.
//!
//! Needs the tools from `tests/tools/build-k8s-tools.sh` (helm, the
//! ServiceMonitor CRD among them); fails (does not skip) without them:
//!
//!     tests/tools/build-k8s-tools.sh
//!     cargo test -p liveclone --features k8s --test k8s_chart -- --nocapture

mod k8s_common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use k8s_common::{repo_root, start};
use kubetest::{ApiServer, Tool};
use serde::Deserialize;
use serde_json::Value;

const NAMESPACE: &str = "liveclone";
const RELEASE: &str = "liveclone";
const DRIVER: &str = "csi.liveclone.io";
const SNAPSHOT_API: &str = "snapshot.storage.k8s.io/v1/VolumeSnapshotClass";

/// Values for LVM classes, a ServiceMonitor and the dm-clone builder.
const LVM_VALUES: &str = "\
deviceClasses:
  - name: thick
    volumeGroup: liveclone
  - name: thin
    volumeGroup: data_vg
    thinPool: pool0
    overprovisionRatio: 2.5
storageClasses:
  - name: liveclone
    deviceClass: file
    fsType: ext4
  - name: liveclone-thin
    deviceClass: thin
    fsType: xfs
    default: true
    reclaimPolicy: Retain
    parameters:
      liveclone.io/regionSize: 64KiB
      liveclone.io/hydrationBatchSize: \"16\"
node:
  kubeletDir: /var/lib/k0s/kubelet
metrics:
  serviceMonitor:
    enabled: true
    labels:
      release: prometheus
dmCloneBuilder:
  enabled: true
";

/// What the e2e suite and the demo install with (docs: the shared interface).
const E2E_VALUES: &str = "\
image:
  repository: liveclone
  tag: e2e
  pullPolicy: Never
metrics:
  enabled: false
snapshotClass:
  create: true
";

struct Helm {
    program: PathBuf,
    chart: PathBuf,
    /// Values files written for the test.
    dir: tempfile::TempDir,
}

impl Helm {
    fn new(program: &Path) -> Self {
        Self {
            program: program.to_owned(),
            chart: repo_root().join("charts/liveclone"),
            dir: tempfile::tempdir().expect("a temporary folder for values files"),
        }
    }

    fn values_file(&self, name: &str, yaml: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, yaml).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }

    /// Runs helm with `args` (no shell); (success, stdout, stderr).
    fn run<I, S>(&self, args: I) -> (bool, String, String)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let output = Command::new(&self.program)
            .args(args)
            // Nothing of the caller's helm setup (repositories, plugins,
            // a kubeconfig) may change what it renders.
            .env("HELM_CONFIG_HOME", self.dir.path().join("config"))
            .env("HELM_CACHE_HOME", self.dir.path().join("cache"))
            .env("HELM_DATA_HOME", self.dir.path().join("data"))
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.program.display()));
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// `helm template` of the chart with `extra` arguments; panics on failure.
    fn template(&self, extra: &[&OsStr]) -> String {
        let (ok, stdout, stderr) = self.run(self.template_args(extra));
        assert!(ok, "helm template {extra:?} failed: {stderr}");
        stdout
    }

    /// `helm template` that must fail; its error message.
    fn template_refused(&self, extra: &[&OsStr]) -> String {
        let (ok, stdout, stderr) = self.run(self.template_args(extra));
        assert!(
            !ok,
            "helm template {extra:?} rendered values it must refuse:\n{stdout}"
        );
        stderr
    }

    fn template_args<'a>(&'a self, extra: &[&'a OsStr]) -> Vec<&'a OsStr> {
        let mut args: Vec<&OsStr> = vec![
            "template".as_ref(),
            RELEASE.as_ref(),
            self.chart.as_os_str(),
            "--namespace".as_ref(),
            NAMESPACE.as_ref(),
        ];
        args.extend_from_slice(extra);
        args
    }
}

/// The documents of a multi-document YAML stream, as JSON values.
fn documents(yaml: &str) -> Vec<Value> {
    yaml_serde::Deserializer::from_str(yaml)
        .map(|document| Value::deserialize(document).expect("helm rendered valid YAML"))
        .filter(|value| !value.is_null())
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("the render has no {kind} {name}"))
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn str_list(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .map(|items| items.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn container<'a>(pod_spec: &'a Value, list: &str, name: &str) -> &'a Value {
    pod_spec[list]
        .as_array()
        .and_then(|containers| containers.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no {list} entry {name}"))
}

/// Every container and init container of a pod spec.
fn all_containers(pod_spec: &Value) -> Vec<&Value> {
    ["initContainers", "containers"]
        .iter()
        .filter_map(|list| pod_spec[*list].as_array())
        .flatten()
        .collect()
}

/// A container's mounts: mount path -> (host path, propagation, read-only),
/// resolved through the pod's volumes (host path "" for non-hostPath ones).
fn mounts(pod_spec: &Value, container: &Value) -> BTreeMap<String, (String, String, bool)> {
    let volumes: BTreeMap<&str, &Value> = pod_spec["volumes"]
        .as_array()
        .expect("the pod has volumes")
        .iter()
        .map(|v| (v["name"].as_str().expect("a volume name"), v))
        .collect();
    container["volumeMounts"]
        .as_array()
        .expect("the container has mounts")
        .iter()
        .map(|m| {
            let volume = m["name"].as_str().expect("a mount's volume name");
            let source = volumes
                .get(volume)
                .unwrap_or_else(|| panic!("a mount of the undeclared volume {volume}"));
            (
                m["mountPath"].as_str().expect("a mount path").to_owned(),
                (
                    source["hostPath"]["path"].as_str().unwrap_or("").to_owned(),
                    m["mountPropagation"].as_str().unwrap_or("None").to_owned(),
                    m["readOnly"].as_bool().unwrap_or(false),
                ),
            )
        })
        .collect()
}

/// What one accepted value set must render, beyond what the API server checks.
struct Expect<'a> {
    kubelet_dir: &'a str,
    image: &'a str,
    device_classes: &'a [&'a str],
    storage_classes: &'a [(&'a str, &'a str, &'a str)],
    snapshot_class: bool,
    metrics: bool,
    service_monitor: bool,
    dm_clone_builder: bool,
}

fn check_invariants(name: &str, objects: &[Value], expect: &Expect) {
    eprintln!("{name}: {} objects", objects.len());

    // The CSIDriver.
    let driver = &find(objects, "CSIDriver", DRIVER)["spec"];
    assert_eq!(driver["attachRequired"], false, "{name}");
    assert_eq!(driver["podInfoOnMount"], true, "{name}");
    assert_eq!(driver["storageCapacity"], true, "{name}");
    assert_eq!(
        str_list(&driver["volumeLifecycleModes"]),
        ["Persistent"],
        "{name}"
    );
    assert_eq!(driver["fsGroupPolicy"], "File", "{name}");

    // StorageClasses: exactly those asked for, with their parameters.
    let classes = of_kind(objects, "StorageClass");
    assert_eq!(
        classes.len(),
        expect.storage_classes.len(),
        "{name}: StorageClasses"
    );
    for (class, device_class, fs_type) in expect.storage_classes {
        let sc = find(objects, "StorageClass", class);
        assert_eq!(sc["provisioner"], DRIVER, "{name}: {class}");
        assert_eq!(
            sc["volumeBindingMode"], "WaitForFirstConsumer",
            "{name}: {class}"
        );
        assert_eq!(sc["allowVolumeExpansion"], true, "{name}: {class}");
        assert_eq!(
            sc["parameters"]["liveclone.io/deviceClass"], *device_class,
            "{name}: {class}"
        );
        assert_eq!(
            sc["parameters"]["csi.storage.k8s.io/fstype"], *fs_type,
            "{name}: {class}"
        );
        // Every liveclone.io/ key must be one the driver knows (it refuses
        // unknown ones at CreateVolume).
        for key in sc["parameters"].as_object().expect("parameters").keys() {
            if let Some(ours) = key.strip_prefix("liveclone.io/") {
                assert!(
                    [
                        "deviceClass",
                        "regionSize",
                        "hydrationThreshold",
                        "hydrationBatchSize"
                    ]
                    .contains(&ours),
                    "{name}: {class} has the unknown parameter {key}"
                );
            }
        }
    }
    assert_eq!(
        of_kind(objects, "VolumeSnapshotClass").len(),
        usize::from(expect.snapshot_class),
        "{name}: VolumeSnapshotClass"
    );
    assert_eq!(
        of_kind(objects, "ServiceMonitor").len(),
        usize::from(expect.service_monitor),
        "{name}: ServiceMonitor"
    );
    assert_eq!(
        of_kind(objects, "Service").len(),
        if expect.metrics { 2 } else { 0 },
        "{name}: metrics Services"
    );

    // Names the other parts of the project rely on.
    for account in ["liveclone-controller", "liveclone-node"] {
        let sa = find(objects, "ServiceAccount", account);
        assert_eq!(sa["metadata"]["namespace"], NAMESPACE, "{name}");
    }
    let deployment = find(objects, "Deployment", "liveclone-controller");
    let daemonset = find(objects, "DaemonSet", "liveclone-node");
    assert_eq!(deployment["spec"]["replicas"], 1, "{name}");
    assert_eq!(
        daemonset["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"], "node",
        "{name}"
    );
    let controller_pod = &deployment["spec"]["template"]["spec"];
    let node_pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(
        controller_pod["serviceAccountName"], "liveclone-controller",
        "{name}"
    );
    assert_eq!(node_pod["serviceAccountName"], "liveclone-node", "{name}");

    // Images: pinned, never :latest; the driver's as asked.
    for pod in [controller_pod, node_pod] {
        for c in all_containers(pod) {
            let image = c["image"].as_str().expect("an image");
            let last = image.rsplit('/').next().unwrap_or(image);
            assert!(
                last.contains(':') || last.contains('@'),
                "{name}: {image} is not pinned"
            );
            assert!(!image.ends_with(":latest"), "{name}: {image}");
            if c["name"] == "liveclone" {
                assert_eq!(image, expect.image, "{name}");
            } else if c["name"] != "dm-clone-builder" {
                assert!(
                    image.starts_with("registry.k8s.io/sig-storage/"),
                    "{name}: {image}"
                );
            }
        }
    }

    // Privilege: only the node's liveclone container; nothing else, and
    // nothing in the controller pod, may escalate or write its root.
    for pod in [controller_pod, node_pod] {
        assert_ne!(pod["hostNetwork"], true, "{name}: hostNetwork");
        assert_ne!(pod["hostPID"], true, "{name}: hostPID");
        assert_ne!(pod["hostIPC"], true, "{name}: hostIPC");
    }
    let mut privileged = Vec::new();
    for (pod_name, pod) in [("controller", controller_pod), ("node", node_pod)] {
        for c in all_containers(pod) {
            let security = &c["securityContext"];
            if security["privileged"] == true {
                privileged.push(format!("{pod_name}/{}", c["name"].as_str().unwrap_or("?")));
                continue;
            }
            assert_eq!(security["allowPrivilegeEscalation"], false, "{name}: {c}");
            let added = str_list(&security["capabilities"]["add"]);
            if c["name"] == "dm-clone-builder" {
                assert_eq!(
                    added,
                    ["SYS_MODULE"],
                    "{name}: the builder only loads modules"
                );
            } else {
                assert!(added.is_empty(), "{name}: {c}");
                assert_eq!(security["readOnlyRootFilesystem"], true, "{name}: {c}");
                assert_eq!(
                    str_list(&security["capabilities"]["drop"]),
                    ["ALL"],
                    "{name}: {c}"
                );
            }
        }
    }
    assert_eq!(
        privileged,
        ["node/liveclone"],
        "{name}: privileged containers"
    );
    assert_eq!(
        controller_pod["securityContext"]["runAsNonRoot"], true,
        "{name}"
    );

    // The controller: Kubernetes mode, capacity tracking, leader election.
    let agent = container(controller_pod, "containers", "liveclone");
    let args = str_list(&agent["args"]);
    assert_eq!(args[..2], ["controller", "--kubernetes"], "{name}");
    let provisioner = container(controller_pod, "containers", "csi-provisioner");
    let provisioner_args = str_list(&provisioner["args"]);
    for wanted in [
        "--enable-capacity",
        "--capacity-ownerref-level=2",
        "--leader-election",
        "--extra-create-metadata",
        "--feature-gates=Topology=true",
    ] {
        assert!(
            provisioner_args.contains(&wanted),
            "{name}: provisioner lacks {wanted}"
        );
    }
    let env: Vec<&str> = provisioner["env"]
        .as_array()
        .expect("the provisioner's env")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert!(
        env.contains(&"POD_NAME") && env.contains(&"NAMESPACE"),
        "{name}"
    );
    for sidecar in ["csi-snapshotter", "csi-resizer"] {
        let args = str_list(&container(controller_pod, "containers", sidecar)["args"]);
        assert!(args.contains(&"--leader-election"), "{name}: {sidecar}");
    }

    // The node plugin: its arguments and host mounts.
    let plugin = container(node_pod, "containers", "liveclone");
    let args = str_list(&plugin["args"]);
    assert_eq!(args[..2], ["node", "--kubernetes"], "{name}");
    let node_id = plugin["env"]
        .as_array()
        .and_then(|env| env.iter().find(|e| e["name"] == "NODE_ID"))
        .expect("NODE_ID");
    assert_eq!(
        node_id["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName",
        "{name}"
    );
    assert_eq!(
        args.contains(&"--device-classes=/etc/liveclone/device-classes.yaml"),
        !expect.device_classes.is_empty(),
        "{name}: --device-classes only with classes"
    );
    assert_eq!(
        args.iter().any(|a| a.starts_with("--metrics-address=")),
        expect.metrics,
        "{name}"
    );
    let kubelet = expect.kubelet_dir;
    let plugin_dir = format!("{kubelet}/plugins/{DRIVER}");
    assert!(
        args.contains(&format!("--allowed-mount-root={kubelet}").as_str()),
        "{name}: {args:?}"
    );
    let plugin_mounts = mounts(node_pod, plugin);
    let host_mount = |path: &str| {
        plugin_mounts
            .get(path)
            .unwrap_or_else(|| {
                panic!("{name}: the plugin does not mount {path}: {plugin_mounts:?}")
            })
            .clone()
    };
    let wanted: [(&str, &str, &str, bool); 9] = [
        (kubelet, kubelet, "Bidirectional", false),
        ("/csi", &plugin_dir, "None", false),
        ("/dev", "/dev", "Bidirectional", false),
        (
            "/var/lib/liveclone/state",
            "/var/lib/liveclone/state",
            "None",
            false,
        ),
        (
            "/var/lib/liveclone/pool",
            "/var/lib/liveclone/pool",
            "None",
            false,
        ),
        ("/run/lock/lvm", "/run/lock/lvm", "None", false),
        ("/run/lvm", "/run/lvm", "None", false),
        // Writable: LVM refuses changes it cannot archive there.
        ("/etc/lvm", "/etc/lvm", "None", false),
        ("/lib/modules", "/lib/modules", "None", true),
    ];
    for (path, host, propagation, read_only) in wanted {
        assert_eq!(
            host_mount(path),
            (host.to_owned(), propagation.to_owned(), read_only),
            "{name}: the plugin's mount of {path}"
        );
    }
    // Every other host folder it mounts is one of the above: a new one must
    // be added here (and to docs/CHART.md) on purpose.
    let host_paths: Vec<&String> = plugin_mounts
        .values()
        .map(|(host, _, _)| host)
        .filter(|host| !host.is_empty())
        .collect();
    assert_eq!(host_paths.len(), wanted.len(), "{name}: {plugin_mounts:?}");
    let registrar = container(node_pod, "containers", "node-driver-registrar");
    assert!(
        str_list(&registrar["args"])
            .contains(&format!("--kubelet-registration-path={plugin_dir}/csi.sock").as_str()),
        "{name}"
    );
    assert_eq!(
        mounts(node_pod, registrar)["/registration"].0,
        format!("{kubelet}/plugins_registry"),
        "{name}"
    );
    // The sidecars get no host folder but the plugin and registration ones.
    for c in all_containers(node_pod) {
        if c["name"] == "liveclone" || c["name"] == "dm-clone-builder" {
            continue;
        }
        for (path, (host, propagation, _)) in mounts(node_pod, c) {
            assert!(
                host == plugin_dir || host == format!("{kubelet}/plugins_registry"),
                "{name}: {} mounts {host} at {path}",
                c["name"]
            );
            assert_eq!(propagation, "None", "{name}");
        }
    }

    // The builder, when asked for.
    let builder = node_pod["initContainers"]
        .as_array()
        .and_then(|list| list.iter().find(|c| c["name"] == "dm-clone-builder"));
    assert_eq!(
        builder.is_some(),
        expect.dm_clone_builder,
        "{name}: dm-clone-builder"
    );
    if let Some(builder) = builder {
        assert_eq!(
            builder["image"], "ghcr.io/liveclone/dm-clone-builder:0.1.0",
            "{name}"
        );
        assert!(str_list(&builder["args"]).contains(&"--load"), "{name}");
        let builder_mounts = mounts(node_pod, builder);
        for (path, host) in [
            ("/var/lib/liveclone/dm-clone", "/var/lib/liveclone/dm-clone"),
            ("/host/etc/os-release", "/etc/os-release"),
            ("/host/lib/modules", "/lib/modules"),
        ] {
            assert_eq!(
                builder_mounts.get(path).map(|m| m.0.as_str()),
                Some(host),
                "{name}: the builder's {path}"
            );
        }
    }

    // The device classes the plugin is given.
    let config_maps = of_kind(objects, "ConfigMap");
    if expect.device_classes.is_empty() {
        assert!(
            config_maps.is_empty(),
            "{name}: a ConfigMap without device classes"
        );
    } else {
        let cm = find(objects, "ConfigMap", "liveclone-device-classes");
        let text = cm["data"]["device-classes.yaml"]
            .as_str()
            .expect("the file");
        let parsed: Value = yaml_serde::from_str(text).expect("the device classes are YAML");
        let names: Vec<&str> = parsed["deviceClasses"]
            .as_array()
            .expect("a deviceClasses list")
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        assert_eq!(names, expect.device_classes, "{name}");
        for class in parsed["deviceClasses"].as_array().into_iter().flatten() {
            assert!(class["lvm"]["volumeGroup"].is_string(), "{name}: {class}");
        }
    }
}

/// `kubectl apply --server-side --dry-run=server` of a render: the API
/// server validates, defaults and admits every object without storing it.
fn dry_run_apply(server: &ApiServer, name: &str, rendered: &str, dir: &Path) {
    let file = dir.join(format!("{name}-render.yaml"));
    std::fs::write(&file, rendered).expect("writing the render");
    let out = server
        .kubectl_output([
            "apply".as_ref(),
            "--server-side".as_ref(),
            "--dry-run=server".as_ref(),
            "--field-manager=helm".as_ref(),
            "-f".as_ref(),
            file.as_os_str(),
        ])
        .unwrap_or_else(|e| panic!("{name}: the API server refused the render: {e:#}"));
    eprint!("{name}: kubectl apply --server-side --dry-run=server:\n{out}");
    let applied = out
        .lines()
        .filter(|l| l.contains("(server dry run)"))
        .count();
    assert_eq!(
        applied,
        documents(rendered).len(),
        "{name}: not every object was applied:\n{out}"
    );
}

fn apply_crds(server: &ApiServer, dir: &Path, crds: &[&str]) {
    let out = server
        .kubectl_output([
            "apply".as_ref(),
            "--server-side".as_ref(),
            "-f".as_ref(),
            dir.as_os_str(),
        ])
        .unwrap_or_else(|e| panic!("kubectl apply -f {}: {e:#}", dir.display()));
    eprint!("{out}");
    let mut wait = vec![
        "wait".to_owned(),
        "--for=condition=Established".to_owned(),
        "--timeout=60s".to_owned(),
    ];
    wait.extend(crds.iter().map(|crd| format!("crd/{crd}")));
    server
        .kubectl_output(&wait)
        .unwrap_or_else(|e| panic!("waiting for {crds:?}: {e:#}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn chart_renders_objects_the_api_server_accepts() {
    let server = start().await;
    let helm = Helm::new(
        server
            .tools()
            .get(Tool::Helm)
            .unwrap_or_else(|e| panic!("{e:#}")),
    );
    let (_, version, _) = helm.run(["version", "--short"]);
    eprintln!("helm {}", version.trim());

    // 1. Lint, strictly, with the defaults and with the fullest value set.
    let lvm_values = helm.values_file("lvm", LVM_VALUES);
    let e2e_values = helm.values_file("e2e", E2E_VALUES);
    for extra in [
        Vec::new(),
        vec!["--values".as_ref(), lvm_values.as_os_str()],
    ] {
        let mut args: Vec<&OsStr> = vec!["lint".as_ref(), "--strict".as_ref()];
        args.push(helm.chart.as_os_str());
        args.extend(extra);
        let (ok, stdout, stderr) = helm.run(&args);
        assert!(ok, "helm lint --strict failed:\n{stdout}{stderr}");
        eprint!("{stdout}");
    }

    // 2. deploy/rbac/*.yaml are the chart's render with default values.
    for (template, file) in [
        (
            "templates/rbac-controller.yaml",
            "deploy/rbac/controller.yaml",
        ),
        ("templates/rbac-node.yaml", "deploy/rbac/node.yaml"),
    ] {
        let rendered = helm.template(&["--show-only".as_ref(), template.as_ref()]);
        let checked_in = std::fs::read_to_string(repo_root().join(file))
            .unwrap_or_else(|e| panic!("reading {file}: {e}"));
        assert!(
            rendered == checked_in,
            "{file} differs from the chart's {template}; regenerate it with\n  \
             helm template {RELEASE} charts/liveclone --namespace {NAMESPACE} \
             --show-only {template} > {file}"
        );
    }

    // 3. Values the schema or the templates must refuse, with the reason.
    let refused: &[(&str, &[&str], &str)] = &[
        (
            "a device class that is no DNS label",
            &[
                "--set",
                "deviceClasses[0].name=Fast_SSD",
                "--set",
                "deviceClasses[0].volumeGroup=vg",
            ],
            "at '/deviceClasses/0/name': 'Fast_SSD' does not match pattern",
        ),
        (
            "an unknown top-level key",
            &["--set", "storageClass.name=x"],
            "additional properties 'storageClass' not allowed",
        ),
        (
            "an unknown key in a StorageClass",
            &[
                "--set",
                "storageClasses[0].name=a",
                "--set",
                "storageClasses[0].deviceClass=file",
                "--set",
                "storageClasses[0].fsType=ext4",
                "--set",
                "storageClasses[0].fstype=xfs",
            ],
            "additional properties 'fstype' not allowed",
        ),
        (
            "a file system the driver cannot make",
            &[
                "--set",
                "storageClasses[0].name=a",
                "--set",
                "storageClasses[0].deviceClass=file",
                "--set",
                "storageClasses[0].fsType=btrfs",
            ],
            "at '/storageClasses/0/fsType'",
        ),
        (
            "an unknown liveclone.io/ parameter",
            &[
                "--set",
                "storageClasses[0].name=a",
                "--set",
                "storageClasses[0].deviceClass=file",
                "--set",
                "storageClasses[0].fsType=ext4",
                "--set-string",
                "storageClasses[0].parameters.liveclone\\.io/regionsize=64KiB",
            ],
            "additional properties 'liveclone.io/regionsize' not allowed",
        ),
        (
            "the driver image at :latest",
            &["--set", "image.tag=latest"],
            "at '/image/tag'",
        ),
        (
            "a sidecar at :latest",
            &[
                "--set",
                "sidecars.resizer.image=registry.k8s.io/sig-storage/csi-resizer:latest",
            ],
            "at '/sidecars/resizer/image'",
        ),
        (
            "a device class named file",
            &[
                "--set",
                "deviceClasses[0].name=file",
                "--set",
                "deviceClasses[0].volumeGroup=vg",
            ],
            "at '/deviceClasses/0/name'",
        ),
        (
            "a thick class with an overprovisioning ratio",
            &[
                "--set",
                "deviceClasses[0].name=thick",
                "--set",
                "deviceClasses[0].volumeGroup=vg",
                "--set",
                "deviceClasses[0].overprovisionRatio=2",
            ],
            "thinPool",
        ),
        (
            "a relative kubelet folder",
            &["--set", "node.kubeletDir=var/lib/kubelet"],
            "at '/node/kubeletDir'",
        ),
        (
            "a snapshot class setting that is neither auto, true nor false",
            &["--set", "snapshotClass.create=maybe"],
            "at '/snapshotClass/create'",
        ),
        (
            "a StorageClass naming an undeclared device class",
            &[
                "--set",
                "storageClasses[0].name=a",
                "--set",
                "storageClasses[0].deviceClass=thin",
                "--set",
                "storageClasses[0].fsType=ext4",
            ],
            "names the device class \"thin\", which is neither `file` nor in deviceClasses",
        ),
        (
            "a device class given twice",
            &[
                "--set",
                "deviceClasses[0].name=a",
                "--set",
                "deviceClasses[0].volumeGroup=vg",
                "--set",
                "deviceClasses[1].name=a",
                "--set",
                "deviceClasses[1].volumeGroup=vg2",
            ],
            "\"a\" is given twice",
        ),
    ];
    for (what, args, message) in refused {
        let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        let error = helm.template_refused(&args);
        assert!(
            error.contains(message),
            "{what}: helm failed, but not with `{message}`:\n{error}"
        );
        eprintln!("refused as it should be: {what}");
    }

    // 4. snapshotClass.create: auto follows the cluster's APIs.
    let count_snapshot_classes = |extra: &[&str]| {
        let args: Vec<&OsStr> = extra.iter().map(OsStr::new).collect();
        of_kind(&documents(&helm.template(&args)), "VolumeSnapshotClass").len()
    };
    assert_eq!(
        count_snapshot_classes(&[]),
        0,
        "auto without the snapshot API"
    );
    assert_eq!(
        count_snapshot_classes(&["--api-versions", SNAPSHOT_API]),
        1,
        "auto with it"
    );
    assert_eq!(
        count_snapshot_classes(&[
            "--api-versions",
            SNAPSHOT_API,
            "--set",
            "snapshotClass.create=false"
        ]),
        0,
        "false"
    );
    assert_eq!(
        count_snapshot_classes(&["--set", "snapshotClass.create=true"]),
        1,
        "true"
    );

    // 5. What the renders are applied against: the release namespace, the
    //    chart's CRDs, the snapshot CRDs and the ServiceMonitor CRD.
    server
        .kubectl_output(["create", "namespace", NAMESPACE])
        .expect("creating the namespace");
    apply_crds(
        &server,
        &helm.chart.join("crds"),
        &[
            "liveclonevolumes.liveclone.io",
            "liveclonesnapshots.liveclone.io",
            "volumehydrations.liveclone.io",
            "liveclonenodes.liveclone.io",
        ],
    );
    server
        .install_snapshot_crds()
        .unwrap_or_else(|e| panic!("installing the snapshot CRDs: {e:#}"));
    apply_crds(
        &server,
        server
            .tools()
            .get(Tool::PrometheusCrds)
            .unwrap_or_else(|e| panic!("{e:#}")),
        &["servicemonitors.monitoring.coreos.com"],
    );

    // 6. Accepted value sets: invariants, then the API server's verdict.
    let renders: [(&str, Vec<&OsStr>, Expect); 3] = [
        (
            "defaults",
            vec!["--api-versions".as_ref(), SNAPSHOT_API.as_ref()],
            Expect {
                kubelet_dir: "/var/lib/kubelet",
                image: "ghcr.io/liveclone/liveclone:0.1.0",
                device_classes: &[],
                storage_classes: &[("liveclone", "file", "ext4")],
                snapshot_class: true,
                metrics: true,
                service_monitor: false,
                dm_clone_builder: false,
            },
        ),
        (
            "lvm",
            vec![
                "--api-versions".as_ref(),
                SNAPSHOT_API.as_ref(),
                "--values".as_ref(),
                lvm_values.as_os_str(),
            ],
            Expect {
                kubelet_dir: "/var/lib/k0s/kubelet",
                image: "ghcr.io/liveclone/liveclone:0.1.0",
                device_classes: &["thick", "thin"],
                storage_classes: &[
                    ("liveclone", "file", "ext4"),
                    ("liveclone-thin", "thin", "xfs"),
                ],
                snapshot_class: true,
                metrics: true,
                service_monitor: true,
                dm_clone_builder: true,
            },
        ),
        (
            "e2e",
            vec!["--values".as_ref(), e2e_values.as_os_str()],
            Expect {
                kubelet_dir: "/var/lib/kubelet",
                image: "liveclone:e2e",
                device_classes: &[],
                storage_classes: &[("liveclone", "file", "ext4")],
                snapshot_class: true,
                metrics: false,
                service_monitor: false,
                dm_clone_builder: false,
            },
        ),
    ];
    for (name, args, expect) in &renders {
        let rendered = helm.template(args);
        let objects = documents(&rendered);
        check_invariants(name, &objects, expect);
        dry_run_apply(&server, name, &rendered, helm.dir.path());
    }

    // The default StorageClass annotation only where asked for.
    let lvm = documents(&helm.template(&["--values".as_ref(), lvm_values.as_os_str()]));
    let annotation = |class: &str| {
        find(&lvm, "StorageClass", class)["metadata"]["annotations"]
            ["storageclass.kubernetes.io/is-default-class"]
            .clone()
    };
    assert_eq!(annotation("liveclone-thin"), "true");
    assert_eq!(annotation("liveclone"), Value::Null);
    let thin = find(&lvm, "StorageClass", "liveclone-thin");
    assert_eq!(thin["reclaimPolicy"], "Retain");
    assert_eq!(thin["parameters"]["liveclone.io/regionSize"], "64KiB");
    assert_eq!(thin["parameters"]["liveclone.io/hydrationBatchSize"], "16");

    server.stop().expect("stopping the API server");
}
