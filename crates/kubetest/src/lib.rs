//! A real Kubernetes API server for tests: etcd and kube-apiserver on
//! 127.0.0.1, on free ports, in a temporary folder, stopped when dropped.
//!
//! No controller-manager, scheduler or kubelet runs: objects are stored,
//! validated, admitted and authorised exactly as in a cluster, but nothing
//! acts on them (a deleted namespace stays `Terminating`, pods stay
//! `Pending`). Authentication is a static admin token (group
//! `system:masters`) and service-account tokens; authorisation is RBAC.
//!
//! The binaries come from `tests/tools/build-k8s-tools.sh` (see [`tools`]
//! and `docs/K8S-TESTING.md`).
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! let server = kubetest::ApiServer::start().await?;
//! let admin = server.client()?;
//! let as_driver = server.client_impersonating_service_account("kube-system", "liveclone")?;
//! server.kubectl_output(["get", "namespaces"])?;
//! # Ok(()) }
//! ```

mod pki;
mod process;
mod stale;
pub mod tools;

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client, Config};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use crate::process::Daemon;
pub use crate::tools::{Tool, Tools};

/// The user of the static admin token.
pub const ADMIN_USER: &str = "kubetest-admin";
/// The issuer of service-account tokens (also their default audience).
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The cluster IP range services are given addresses from (never routed).
pub const SERVICE_CLUSTER_IP_RANGE: &str = "10.0.0.0/24";

/// How to start the server.
#[derive(Debug, Clone)]
pub struct Options {
    /// Extra kube-apiserver flags (`--name=value`), after the harness's own;
    /// kube-apiserver takes the last value of a repeated flag.
    pub extra_apiserver_args: Vec<String>,
    /// How long etcd plus kube-apiserver may take to become ready.
    pub startup_timeout: Duration,
    /// Keep the temporary folder (logs, kubeconfig, etcd data) after the
    /// server stops. Also on when the environment has
    /// `LIVECLONE_KUBETEST_KEEP=1`.
    pub keep_dir: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            extra_apiserver_args: Vec::new(),
            startup_timeout: Duration::from_secs(90),
            keep_dir: std::env::var_os("LIVECLONE_KUBETEST_KEEP").is_some_and(|v| v == "1"),
        }
    }
}

/// A running etcd + kube-apiserver pair. Dropping it kills both (SIGKILL)
/// and removes the folder; [`ApiServer::stop`] stops them gracefully.
pub struct ApiServer {
    // Fields drop in this order: the API server before etcd, the folder last.
    apiserver: Daemon,
    etcd: Daemon,
    url: String,
    etcd_url: String,
    kubeconfig: PathBuf,
    kubectl_cache: PathBuf,
    ca_cert_path: PathBuf,
    ca_cert_pem: String,
    ca_cert_der: Vec<u8>,
    admin_token: String,
    tools: Tools,
    dir: Option<TempDir>,
    dir_path: PathBuf,
    keep_dir: bool,
}

/// Attempts when a port picked as free was taken before the daemon bound it.
const PORT_ATTEMPTS: usize = 3;

impl ApiServer {
    /// Finds the binaries ([`Tools::locate`]) and starts with default options.
    pub async fn start() -> Result<Self> {
        Self::start_with(Tools::locate()?, Options::default()).await
    }

    /// Starts etcd, then kube-apiserver against it, and waits until the API
    /// server answers `/readyz` and the `default` namespace exists. On
    /// failure the error carries the end of the failing daemon's log.
    pub async fn start_with(tools: Tools, options: Options) -> Result<Self> {
        let deadline = Instant::now() + options.startup_timeout;
        let etcd_bin = tools.get(Tool::Etcd)?.to_owned();
        let apiserver_bin = tools.get(Tool::KubeApiserver)?.to_owned();
        tools.get(Tool::Kubectl)?;

        stale::sweep(&std::env::temp_dir());
        let dir = tempfile::Builder::new()
            .prefix(stale::DIR_PREFIX)
            .tempdir()
            .context("creating the server's temporary folder")?;
        // Kept folders are kept from here on, also when starting fails.
        let (dir, dir_path) = if options.keep_dir {
            let path = dir.keep();
            eprintln!("kubetest: keeping {}", path.display());
            (None, path)
        } else {
            let path = dir.path().to_owned();
            // So that a later start removes it if this process is killed.
            stale::mark_owner(&path)?;
            (Some(dir), path)
        };
        let files = write_files(&dir_path)?;
        let etcd_extra = etcd_optional_flags(&etcd_bin);

        let mut attempt = 0;
        let (etcd, etcd_url, apiserver, port) = loop {
            attempt += 1;
            let [etcd_client, etcd_peer, secure] = free_ports()?;
            let launch = Launch {
                dir: &dir_path,
                files: &files,
                etcd_bin: &etcd_bin,
                apiserver_bin: &apiserver_bin,
                etcd_extra: &etcd_extra,
                options: &options,
                deadline,
            };
            match start_pair(&launch, [etcd_client, etcd_peer, secure]).await {
                Ok(StartOutcome::Running(etcd, apiserver)) => {
                    break (
                        etcd,
                        format!("http://127.0.0.1:{etcd_client}"),
                        apiserver,
                        secure,
                    );
                }
                Ok(StartOutcome::PortTaken(what)) if attempt < PORT_ATTEMPTS => {
                    eprintln!("kubetest: {what} lost its port to another process; retrying");
                }
                Ok(StartOutcome::PortTaken(what)) => {
                    bail!("{what} could not bind its port in {PORT_ATTEMPTS} attempts")
                }
                Err(e) => return Err(e),
            }
        };

        let url = format!("https://127.0.0.1:{port}");
        let kubeconfig = dir_path.join("kubeconfig");
        write_kubeconfig(
            &kubeconfig,
            &url,
            &files.ca_cert,
            ADMIN_USER,
            &files.admin_token,
        )?;
        let mut server = Self {
            apiserver,
            etcd,
            url,
            etcd_url,
            kubeconfig,
            kubectl_cache: dir_path.join("kubectl-cache"),
            ca_cert_path: files.ca_cert,
            ca_cert_pem: files.ca_cert_pem,
            ca_cert_der: files.ca_cert_der,
            admin_token: files.admin_token,
            tools,
            dir,
            dir_path,
            keep_dir: options.keep_dir,
        };
        server.wait_ready(deadline, options.startup_timeout).await?;
        Ok(server)
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `http://127.0.0.1:<port>` of etcd.
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }

    /// The admin kubeconfig (JSON, which kubectl and client libraries read
    /// as YAML): the server URL, the CA by path, the admin token inline.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The server's temporary folder: logs (`etcd.log`,
    /// `kube-apiserver.log`), keys, kubeconfig, etcd data.
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// Whether the folder stays after the server stops ([`Options::keep_dir`]).
    pub fn keeps_dir(&self) -> bool {
        self.keep_dir
    }

    /// The CA that signed the serving certificate, PEM.
    pub fn ca_cert_pem(&self) -> &str {
        &self.ca_cert_pem
    }

    /// The binaries in use, including the CSI sidecars for tests that run them.
    pub fn tools(&self) -> &Tools {
        &self.tools
    }

    /// The client configuration of the admin user (group `system:masters`).
    pub fn admin_config(&self) -> Result<Config> {
        let mut config = Config::new(
            self.url
                .parse()
                .with_context(|| format!("parsing {}", self.url))?,
        );
        config.root_cert = Some(vec![self.ca_cert_der.clone()]);
        config.auth_info.token = Some(self.admin_token.clone().into());
        // The readiness wait should see errors, not retry them.
        config.default_retry = false;
        Ok(config)
    }

    /// An admin client. Must be called inside a Tokio runtime.
    pub fn client(&self) -> Result<Client> {
        Client::try_from(self.admin_config()?).context("building the admin client")
    }

    /// A client that authenticates as the admin and impersonates `user` in
    /// `groups` (the API server checks RBAC as that user).
    pub fn client_impersonating(&self, user: &str, groups: &[&str]) -> Result<Client> {
        let mut config = self.admin_config()?;
        config.auth_info.impersonate = Some(user.to_owned());
        config.auth_info.impersonate_groups = Some(groups.iter().map(|g| g.to_string()).collect());
        Client::try_from(config).with_context(|| format!("building a client impersonating {user}"))
    }

    /// A client acting as the ServiceAccount `namespace/name`, by
    /// impersonation: the user and groups a real token of that account
    /// carries, so the account's RBAC is what is enforced. The
    /// ServiceAccount object need not exist.
    pub fn client_impersonating_service_account(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Client> {
        let user = format!("system:serviceaccount:{namespace}:{name}");
        let namespace_group = format!("system:serviceaccounts:{namespace}");
        self.client_impersonating(
            &user,
            &[
                "system:serviceaccounts",
                &namespace_group,
                "system:authenticated",
            ],
        )
    }

    /// A client with a real token of the ServiceAccount `namespace/name`
    /// (created if missing), from the TokenRequest API: authentication goes
    /// through the service-account token path, signed with this server's key.
    pub async fn service_account_client(&self, namespace: &str, name: &str) -> Result<Client> {
        let token = self.service_account_token(namespace, name).await?;
        let mut config = self.admin_config()?;
        config.auth_info.token = Some(token.into());
        Client::try_from(config)
            .with_context(|| format!("building a client for service account {namespace}/{name}"))
    }

    /// A token of the ServiceAccount `namespace/name` (created if missing),
    /// valid for an hour.
    pub async fn service_account_token(&self, namespace: &str, name: &str) -> Result<String> {
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client()?, namespace);
        let account = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        };
        match accounts.create(&PostParams::default(), &account).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("creating service account {namespace}/{name}"))
            }
        }
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![SERVICE_ACCOUNT_ISSUER.to_owned()],
                expiration_seconds: Some(3600),
                ..TokenRequestSpec::default()
            },
            ..TokenRequest::default()
        };
        let answer = accounts
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .with_context(|| format!("requesting a token for {namespace}/{name}"))?;
        let status = answer
            .status
            .ok_or_else(|| anyhow!("the TokenRequest for {namespace}/{name} has no status"))?;
        Ok(status.token)
    }

    /// Writes a kubeconfig (mode 0600, in the server's folder) that
    /// authenticates with a fresh token of the ServiceAccount
    /// `namespace/name` (created if missing), for child processes such as
    /// the CSI sidecars, which then act exactly as that account would in a
    /// pod. Returns its path; the token is valid for an hour.
    pub async fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> Result<PathBuf> {
        let token = self.service_account_token(namespace, name).await?;
        let path = self.dir_path.join(format!("kubeconfig-{namespace}-{name}"));
        write_kubeconfig(
            &path,
            &self.url,
            &self.ca_cert_path,
            &format!("system:serviceaccount:{namespace}:{name}"),
            &token,
        )?;
        Ok(path)
    }

    /// kubectl with the admin kubeconfig and a private cache folder (nothing
    /// is written under `~/.kube`); add arguments and run it.
    pub fn kubectl(&self) -> Result<Command> {
        let mut cmd = Command::new(self.tools.get(Tool::Kubectl)?);
        cmd.env_remove("KUBECONFIG")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.kubectl_cache)
            .stdin(Stdio::null());
        Ok(cmd)
    }

    /// Runs kubectl with `args`; its stdout if it succeeds, else an error
    /// with its stderr.
    pub fn kubectl_output<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args
            .into_iter()
            .map(|a| a.as_ref().to_os_string())
            .collect();
        let output: Output = self
            .kubectl()?
            .args(&args)
            .output()
            .context("running kubectl")?;
        let shown = args
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        if !output.status.success() {
            bail!(
                "kubectl {shown} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        String::from_utf8(output.stdout)
            .with_context(|| format!("kubectl {shown}: stdout is not UTF-8"))
    }

    /// Applies the VolumeSnapshot, VolumeSnapshotContent and
    /// VolumeSnapshotClass CRDs and waits until they are served.
    pub fn install_snapshot_crds(&self) -> Result<()> {
        let dir = self.tools.get(Tool::SnapshotCrds)?;
        self.kubectl_output([OsStr::new("apply"), OsStr::new("-f"), dir.as_os_str()])?;
        self.kubectl_output([
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/volumesnapshots.snapshot.storage.k8s.io",
            "crd/volumesnapshotcontents.snapshot.storage.k8s.io",
            "crd/volumesnapshotclasses.snapshot.storage.k8s.io",
        ])?;
        Ok(())
    }

    /// Stops kube-apiserver then etcd with SIGTERM (SIGKILL after 10 s), and
    /// removes the folder unless asked to keep it.
    pub fn stop(mut self) -> Result<()> {
        self.apiserver
            .stop(Duration::from_secs(10))
            .context("stopping kube-apiserver")?;
        self.etcd
            .stop(Duration::from_secs(10))
            .context("stopping etcd")?;
        if let Some(dir) = self.dir.take() {
            dir.close()
                .with_context(|| format!("removing {}", self.dir_path.display()))?;
        }
        Ok(())
    }

    /// The process IDs of etcd and kube-apiserver while they run.
    pub fn pids(&self) -> (Option<u32>, Option<u32>) {
        (self.etcd.pid(), self.apiserver.pid())
    }

    async fn wait_ready(&mut self, deadline: Instant, timeout: Duration) -> Result<()> {
        let client = self.client()?;
        loop {
            self.check_running()?;
            let request = http::Request::get("/readyz")
                .body(Vec::new())
                .context("building the /readyz request")?;
            let last = match client.request_text(request).await {
                Ok(body) if body.trim() == "ok" => break,
                Ok(body) => format!("/readyz answered {body:?}"),
                Err(e) => format!("/readyz: {e}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "kube-apiserver not ready after {timeout:?} ({last}); log {}:\n{}",
                    self.apiserver.log_path().display(),
                    self.apiserver.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // The `default` namespace is made by a controller inside the API
        // server shortly after it is ready; tests expect it.
        let namespaces: Api<Namespace> = Api::all(client);
        loop {
            if namespaces
                .get_opt("default")
                .await
                .context("reading namespace default")?
                .is_some()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("namespace default did not appear within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// An error with the log's end if either daemon has ended.
    fn check_running(&mut self) -> Result<()> {
        for daemon in [&mut self.etcd, &mut self.apiserver] {
            if let Some(status) = daemon.exited()? {
                bail!(
                    "{} exited ({status}); log {}:\n{}",
                    daemon.name(),
                    daemon.log_path().display(),
                    daemon.log_tail(40)
                );
            }
        }
        Ok(())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // Explicit order (the fields would drop in it too): the API server
        // first, so that it does not log etcd's disappearance at length.
        self.apiserver.kill();
        self.etcd.kill();
        if self.keep_dir {
            eprintln!("kubetest: kept {}", self.dir_path.display());
        }
    }
}

struct Files {
    ca_cert: PathBuf,
    ca_cert_pem: String,
    ca_cert_der: Vec<u8>,
    serving_cert: PathBuf,
    serving_key: PathBuf,
    service_account_key: PathBuf,
    service_account_public: PathBuf,
    token_file: PathBuf,
    admin_token: String,
    pki_dir: PathBuf,
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))
}

fn write_files(dir: &Path) -> Result<Files> {
    let pki = pki::generate()?;
    let pki_dir = dir.join("pki");
    fs::create_dir(&pki_dir).with_context(|| format!("creating {}", pki_dir.display()))?;
    let files = Files {
        ca_cert: pki_dir.join("ca.crt"),
        serving_cert: pki_dir.join("apiserver.crt"),
        serving_key: pki_dir.join("apiserver.key"),
        service_account_key: pki_dir.join("sa.key"),
        service_account_public: pki_dir.join("sa.pub"),
        token_file: dir.join("tokens.csv"),
        admin_token: random_token()?,
        ca_cert_pem: pki.ca_cert_pem.clone(),
        ca_cert_der: pki.ca_cert_der.clone(),
        pki_dir,
    };
    write_private(&files.ca_cert, &pki.ca_cert_pem)?;
    write_private(&files.serving_cert, &pki.serving_cert_pem)?;
    write_private(&files.serving_key, &pki.serving_key_pem)?;
    write_private(&files.service_account_key, &pki.service_account_key_pem)?;
    write_private(
        &files.service_account_public,
        &pki.service_account_public_pem,
    )?;
    // token,user,uid,"group,..."
    write_private(
        &files.token_file,
        &format!(
            "{},{ADMIN_USER},{ADMIN_USER},\"system:masters\"\n",
            files.admin_token
        ),
    )?;
    Ok(files)
}

/// 32 hex digits from the kernel's random source.
fn random_token() -> Result<String> {
    let mut bytes = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    let mut token = String::with_capacity(32);
    for byte in bytes {
        let _ = write!(token, "{byte:02x}");
    }
    Ok(token)
}

/// Three distinct free ports on 127.0.0.1 (held together while picked, so
/// they differ; another process may still take one before the daemon
/// binds it, which [`ApiServer::start_with`] retries).
fn free_ports() -> Result<[u16; 3]> {
    let listeners = [
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)),
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)),
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)),
    ];
    let mut ports = [0u16; 3];
    for (port, listener) in ports.iter_mut().zip(listeners) {
        *port = listener
            .and_then(|l| l.local_addr())
            .context("picking a free port on 127.0.0.1")?
            .port();
    }
    Ok(ports)
}

/// Flags only some etcd versions know: fsync off (the data is thrown away
/// after the test anyway), when this etcd has the flag.
fn etcd_optional_flags(etcd: &Path) -> Vec<String> {
    let help = Command::new(etcd)
        .arg("--help")
        .stdin(Stdio::null())
        .output()
        .map(|out| {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            text
        })
        .unwrap_or_default();
    let mut flags = Vec::new();
    if help.contains("--unsafe-no-fsync") {
        flags.push("--unsafe-no-fsync".to_owned());
    }
    flags
}

enum StartOutcome {
    Running(Daemon, Daemon),
    /// Which daemon found its port taken.
    PortTaken(&'static str),
}

fn port_taken(daemon: &Daemon) -> bool {
    daemon.log_tail(40).contains("address already in use")
}

/// Everything one start attempt needs but the ports.
struct Launch<'a> {
    dir: &'a Path,
    files: &'a Files,
    etcd_bin: &'a Path,
    apiserver_bin: &'a Path,
    etcd_extra: &'a [String],
    options: &'a Options,
    deadline: Instant,
}

async fn start_pair(
    launch: &Launch<'_>,
    [etcd_client, etcd_peer, secure]: [u16; 3],
) -> Result<StartOutcome> {
    let Launch {
        dir,
        files,
        etcd_bin,
        apiserver_bin,
        etcd_extra,
        options,
        deadline,
    } = *launch;
    let data_dir = dir.join("etcd-data");
    // A retry starts from an empty data folder.
    if data_dir.exists() {
        fs::remove_dir_all(&data_dir)
            .with_context(|| format!("removing {}", data_dir.display()))?;
    }
    let client_url = format!("http://127.0.0.1:{etcd_client}");
    let peer_url = format!("http://127.0.0.1:{etcd_peer}");
    let mut etcd_args: Vec<String> = vec![
        "--name=kubetest".into(),
        format!("--data-dir={}", path_arg(&data_dir)?),
        format!("--listen-client-urls={client_url}"),
        format!("--advertise-client-urls={client_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster=kubetest={peer_url}"),
        "--initial-cluster-state=new".into(),
    ];
    etcd_args.extend(etcd_extra.iter().cloned());
    let mut etcd = Daemon::spawn("etcd", etcd_bin, &etcd_args, &dir.join("etcd.log"))?;
    loop {
        if let Some(status) = etcd.exited()? {
            if port_taken(&etcd) {
                return Ok(StartOutcome::PortTaken("etcd"));
            }
            bail!(
                "etcd exited ({status}) while starting; log {}:\n{}",
                etcd.log_path().display(),
                etcd.log_tail(30)
            );
        }
        if etcd_healthy(etcd_client).await {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "etcd not healthy after {:?}; log {}:\n{}",
                options.startup_timeout,
                etcd.log_path().display(),
                etcd.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut args: Vec<String> = vec![
        format!("--etcd-servers={client_url}"),
        "--storage-backend=etcd3".into(),
        "--bind-address=127.0.0.1".into(),
        "--advertise-address=127.0.0.1".into(),
        format!("--secure-port={secure}"),
        format!("--cert-dir={}", path_arg(&files.pki_dir)?),
        format!("--tls-cert-file={}", path_arg(&files.serving_cert)?),
        format!("--tls-private-key-file={}", path_arg(&files.serving_key)?),
        format!("--token-auth-file={}", path_arg(&files.token_file)?),
        "--authorization-mode=RBAC".into(),
        format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
        format!(
            "--service-account-key-file={}",
            path_arg(&files.service_account_public)?
        ),
        format!(
            "--service-account-signing-key-file={}",
            path_arg(&files.service_account_key)?
        ),
        format!("--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"),
        // The ServiceAccount admission plugin refuses pods whose account
        // does not exist; the controller that makes `default` accounts is
        // not running.
        "--disable-admission-plugins=ServiceAccount".into(),
        // Nothing would serve the `kubernetes` Service's endpoints, and a
        // loopback address is not a valid endpoint.
        "--endpoint-reconciler-type=none".into(),
        // The driver's node pods are privileged; let such objects in.
        "--allow-privileged=true".into(),
        "--profiling=false".into(),
    ];
    args.extend(options.extra_apiserver_args.iter().cloned());
    let mut apiserver = Daemon::spawn(
        "kube-apiserver",
        apiserver_bin,
        &args,
        &dir.join("kube-apiserver.log"),
    )?;
    // Bound its port, or failed? (Readiness proper is checked later.)
    loop {
        if let Some(status) = apiserver.exited()? {
            if port_taken(&apiserver) {
                return Ok(StartOutcome::PortTaken("kube-apiserver"));
            }
            bail!(
                "kube-apiserver exited ({status}) while starting; log {}:\n{}",
                apiserver.log_path().display(),
                apiserver.log_tail(40)
            );
        }
        if TcpStream::connect((Ipv4Addr::LOCALHOST, secure))
            .await
            .is_ok()
        {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "kube-apiserver did not listen on 127.0.0.1:{secure} within {:?}; log {}:\n{}",
                options.startup_timeout,
                apiserver.log_path().display(),
                apiserver.log_tail(40)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(StartOutcome::Running(etcd, apiserver))
}

fn path_arg(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("path {} is not UTF-8", path.display()))
}

/// etcd's /health says `"health":"true"` (plain HTTP on loopback).
async fn etcd_healthy(port: u16) -> bool {
    let probe = async {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
        stream
            .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    match tokio::time::timeout(Duration::from_secs(2), probe).await {
        Ok(Ok(answer)) => String::from_utf8_lossy(&answer).contains("\"health\":\"true\""),
        _ => false,
    }
}

/// A kubeconfig of one user with a bearer token (the admin's, or a service
/// account's): JSON is valid YAML, and serde_json is at hand.
fn write_kubeconfig(path: &Path, url: &str, ca_cert: &Path, user: &str, token: &str) -> Result<()> {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "kubetest",
            "cluster": {"server": url, "certificate-authority": path_arg(ca_cert)?},
        }],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{
            "name": "kubetest",
            "context": {"cluster": "kubetest", "user": user, "namespace": "default"},
        }],
        "current-context": "kubetest",
    });
    let text = serde_json::to_string_pretty(&config).context("serialising the kubeconfig")?;
    write_private(path, &text)
}
