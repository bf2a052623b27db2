//! Shared harness of Corral's integration tests: a control plane started
//! in-process on real loopback sockets, in-process agents on the fake runtime
//! that talk to it over real gRPC, the real `corral` and `corral-agent`
//! binaries as child processes, a small REST client and `wait_for`, which
//! polls a condition until a deadline instead of sleeping.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use corral_agent::fake::{FakeConfig, FakeRuntime};
use corral_agent::AgentConfig;
use corral_api::server::{Server, ServerConfig};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub mod bench;
pub mod netlab;

/// The credit test orgs start with: enough for any test's sandboxes.
pub const TEST_CREDITS_MICROS: i64 = 1_000_000_000;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";

/// A plain HTTP client for tests. reqwest has no crypto provider of its
/// own: this installs ring first, so it works in any order.
pub fn http_client() -> reqwest::Client {
    corral_api::tls::install_crypto_provider();
    reqwest::Client::new()
}

/// Waits until the control plane at `base` answers `/readyz` with a 2xx.
pub async fn wait_ready(base: &str, timeout: Duration) {
    let url = format!("{base}/readyz");
    wait_for("the server to be ready", timeout, || {
        let url = url.clone();
        async move {
            let ok = http_client().get(url).send().await.ok()?;
            ok.status().is_success().then_some(())
        }
    })
    .await;
}

/// Installs a log subscriber once (RUST_LOG controls it; quiet by default).
pub fn init_logging() {
    // reqwest has no crypto provider of its own: install ring before any
    // client is built (every test starts here or in Api::new).
    corral_api::tls::install_crypto_provider();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Polls `check` every 25 ms until it yields a value or `timeout` passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A REST client holding one bearer token.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub token: String,
    client: reqwest::Client,
}

impl Api {
    pub fn new(base: impl Into<String>, token: impl Into<String>) -> Self {
        Self {
            base: base.into(),
            token: token.into(),
            client: http_client(),
        }
    }

    pub fn with_token(&self, token: impl Into<String>) -> Self {
        Self::new(self.base.clone(), token)
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("the REST API answers");
        let status = response.status();
        let bytes = response.bytes().await.expect("a response body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                panic!(
                    "non-JSON body ({status}): {}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        (status, body)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.client.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(self.client.post(format!("{}{path}", self.base)).json(&body))
            .await
    }

    pub async fn put(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(self.client.put(format!("{}{path}", self.base)).json(&body))
            .await
    }

    pub async fn post_raw(&self, path: &str, body: &'static str) -> (StatusCode, Value) {
        self.send(
            self.client
                .post(format!("{}{path}", self.base))
                .header("content-type", "application/json")
                .body(body),
        )
        .await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.client.delete(format!("{}{path}", self.base)))
            .await
    }
}

/// The error code of an error response.
/// One unlabelled figure of the Prometheus page `{base}/metrics`.
pub async fn metric(base: &str, name: &str) -> Option<f64> {
    let text = http_client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

pub fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no error code>")
}

/// A control plane in this process, on real loopback sockets, with SQLite in
/// a temporary directory (or `database_url`).
pub struct TestServer {
    pub server: Server,
    pub dir: tempfile::TempDir,
    config: ServerConfig,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut ServerConfig)) -> Self {
        init_logging();
        let dir = tempfile::tempdir().expect("a temp dir");
        let mut config =
            ServerConfig::local(dir.path().to_path_buf(), Some(ADMIN_TOKEN.to_string()));
        config.heartbeat_ms = 500;
        config.stop_grace_ms = 2000;
        tweak(&mut config);
        let server = Server::start(config.clone())
            .await
            .expect("the server starts");
        Self {
            server,
            dir,
            config,
        }
    }

    /// Stops the control plane and starts a new one on the same database and
    /// addresses, as a process restart would.
    pub async fn restart(self) -> Self {
        self.restart_after(async {}).await
    }

    /// Like [`Self::restart`], with `downtime` resolving while no control
    /// plane runs.
    pub async fn restart_after(self, downtime: impl Future<Output = ()>) -> Self {
        let Self {
            server,
            dir,
            mut config,
        } = self;
        config.http_addr = server.http_addr;
        config.grpc_addr = server.grpc_addr;
        server.shutdown().await;
        downtime.await;
        let server = Server::start(config.clone())
            .await
            .expect("the server restarts");
        Self {
            server,
            dir,
            config,
        }
    }

    pub fn admin(&self) -> Api {
        Api::new(self.server.http_url(), ADMIN_TOKEN)
    }

    /// Creates an org; returns its id and a client holding its API key.
    /// Creates an org with ample credit ([`TEST_CREDITS_MICROS`]); returns
    /// its id and a client holding its API key.
    pub async fn create_org(&self, name: &str) -> (String, Api) {
        self.create_org_with(json!({ "name": name, "credits_micros": TEST_CREDITS_MICROS }))
            .await
    }

    /// Creates an org from a full request body (credits, plan, quota...).
    pub async fn create_org_with(&self, request: Value) -> (String, Api) {
        let (status, body) = self.admin().post("/v1/admin/orgs", request).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let org_id = body["org"]["id"].as_str().expect("org id").to_string();
        let key = body["api_key"]["secret"].as_str().expect("key").to_string();
        (org_id, Api::new(self.server.http_url(), key))
    }

    /// Creates a price plan charging `cpu_micros_per_vcpu_hour` for CPU and
    /// nothing for memory.
    pub async fn create_plan(&self, name: &str, cpu_micros_per_vcpu_hour: i64) {
        let (status, body) = self
            .admin()
            .post(
                "/v1/admin/plans",
                json!({"name": name, "cpu_micros_per_vcpu_hour": cpu_micros_per_vcpu_hour,
                       "memory_micros_per_gib_hour": 0}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    /// Issues a host token; returns (host id, token).
    pub async fn host_token(&self, name: &str) -> (String, String) {
        let (status, body) = self
            .admin()
            .post("/v1/admin/host-tokens", json!({ "name": name }))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        (
            body["host_id"].as_str().expect("host id").to_string(),
            body["token"].as_str().expect("token").to_string(),
        )
    }

    /// Waits until `host_id` is connected and schedulable.
    pub async fn wait_host_ready(&self, host_id: &str) {
        let cp = self.server.control_plane.clone();
        wait_for(
            "the host to be schedulable",
            Duration::from_secs(15),
            || {
                let cp = cp.clone();
                let host_id = host_id.to_string();
                async move {
                    let capacity = cp.capacity().await.ok()?;
                    capacity.get(&host_id).filter(|c| c.schedulable).map(|_| ())
                }
            },
        )
        .await;
    }

    /// Starts an in-process agent on the fake runtime with host `labels`,
    /// on a token of `org_id`'s private pool if given (issued through the
    /// admin API), and waits until its host is schedulable.
    pub async fn fake_agent_labeled(
        &self,
        cpu_millis: u32,
        memory_mb: u64,
        fake: FakeConfig,
        labels: &[(&str, &str)],
        org_id: Option<&str>,
    ) -> InProcessAgent {
        let mut request = json!({ "name": "fake" });
        if let Some(org) = org_id {
            request["org_id"] = json!(org);
        }
        let (status, body) = self.admin().post("/v1/admin/host-tokens", request).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let host_id = body["host_id"].as_str().expect("host id").to_string();
        let token = body["token"].as_str().expect("token").to_string();
        let config = AgentConfig {
            control_plane_url: self.server.grpc_url(),
            token,
            hostname: "fake-host".into(),
            cpu_millis,
            memory_mb,
            max_concurrent_commands: 64,
            poll_interval: Duration::from_millis(200),
            tls: Default::default(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let agent = InProcessAgent::start_config(&host_id, config, fake);
        self.wait_host_ready(&host_id).await;
        agent
    }

    /// Starts an in-process agent on the fake runtime and waits until its
    /// host is schedulable.
    pub async fn fake_agent(
        &self,
        cpu_millis: u32,
        memory_mb: u64,
        fake: FakeConfig,
    ) -> InProcessAgent {
        let (host_id, token) = self.host_token("fake").await;
        let agent = InProcessAgent::start(
            &host_id,
            &self.server.grpc_url(),
            &token,
            cpu_millis,
            memory_mb,
            fake,
        );
        self.wait_host_ready(&host_id).await;
        agent
    }
}

/// An agent running in this process on the fake runtime, connected over
/// real gRPC. Its runtime outlives it: [`InProcessAgent::kill`] then
/// [`InProcessAgent::revive`] is an agent restart on the same host.
pub struct InProcessAgent {
    pub host_id: String,
    pub runtime: FakeRuntime,
    config: AgentConfig,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl InProcessAgent {
    /// Starts an agent for `host_id` (the host its `token` names).
    pub fn start(
        host_id: &str,
        url: &str,
        token: &str,
        cpu_millis: u32,
        memory_mb: u64,
        fake: FakeConfig,
    ) -> Self {
        Self::start_tls(
            host_id,
            url,
            token,
            cpu_millis,
            memory_mb,
            fake,
            corral_agent::AgentTls::default(),
        )
    }

    /// Like [`Self::start`], with the agent's TLS settings.
    pub fn start_tls(
        host_id: &str,
        url: &str,
        token: &str,
        cpu_millis: u32,
        memory_mb: u64,
        fake: FakeConfig,
        tls: corral_agent::AgentTls,
    ) -> Self {
        let config = AgentConfig {
            control_plane_url: url.to_string(),
            token: token.to_string(),
            hostname: "fake-host".into(),
            cpu_millis,
            memory_mb,
            max_concurrent_commands: 64,
            poll_interval: Duration::from_millis(200),
            tls,
            labels: Default::default(),
        };
        Self::start_config(host_id, config, fake)
    }

    /// Starts an agent with a full config (labels, capacity, TLS).
    pub fn start_config(host_id: &str, config: AgentConfig, fake: FakeConfig) -> Self {
        let runtime = FakeRuntime::new(fake);
        let (shutdown, task) = Self::spawn(&config, &runtime);
        Self {
            host_id: host_id.to_string(),
            runtime,
            config,
            shutdown: Some(shutdown),
            task,
        }
    }

    fn spawn(
        config: &AgentConfig,
        runtime: &FakeRuntime,
    ) -> (oneshot::Sender<()>, JoinHandle<anyhow::Result<()>>) {
        let (tx, rx) = oneshot::channel::<()>();
        let shared: Arc<dyn corral_agent::runtime::Runtime> = Arc::new(runtime.clone());
        let task = tokio::spawn(corral_agent::run_agent(
            config.clone(),
            shared,
            async move {
                let _ = rx.await;
            },
        ));
        (tx, task)
    }

    /// Ends the agent abruptly: its stream is cut mid-flight, as when the
    /// process dies. Its sandboxes stay in the runtime.
    pub fn kill(&self) {
        self.task.abort();
    }

    /// Starts the agent again on the same runtime (after [`Self::kill`]).
    pub fn revive(&mut self) {
        self.task.abort();
        let (shutdown, task) = Self::spawn(&self.config, &self.runtime);
        self.shutdown = Some(shutdown);
        self.task = task;
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
    }
}

impl Drop for InProcessAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A binary of this workspace, built by `cargo build --bins`.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // A test runs from target/debug/deps/<test> (the binaries are one level
    // up); the bench binary runs beside them.
    if let Some(beside) = exe
        .parent()
        .map(|dir| dir.join(name))
        .filter(|p| p.is_file())
    {
        return beside;
    }
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --bins`, as scripts/test does)",
        path.display()
    );
    path
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A child process that is killed when dropped.
pub struct ChildProcess {
    pub child: tokio::process::Child,
    pub name: String,
}

impl ChildProcess {
    pub fn spawn(name: &str, command: &mut tokio::process::Command) -> Self {
        let child = command
            .kill_on_drop(true)
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Self {
            child,
            name: name.to_string(),
        }
    }

    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Sends SIGKILL to the process itself (not a wrapper), reaps it and
    /// asserts it is gone: no exit handler, no shutdown, no clean-up runs.
    pub async fn kill_hard(&mut self) {
        let pid = self
            .child
            .id()
            .unwrap_or_else(|| panic!("{} has already exited", self.name));
        self.child
            .kill()
            .await
            .unwrap_or_else(|e| panic!("SIGKILL to {}: {e}", self.name));
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "{} (pid {pid}) is still there after SIGKILL",
            self.name
        );
    }
}

/// Creates a sandbox and asserts it was created.
pub async fn create_sandbox(api: &Api, body: Value) -> Value {
    let (status, sandbox) = api.post("/v1/sandboxes", body).await;
    assert_eq!(status, StatusCode::CREATED, "create failed: {sandbox}");
    sandbox
}

/// The id of a JSON object.
pub fn id_of(value: &Value) -> String {
    value["id"].as_str().expect("an id").to_string()
}

/// Whether the test must run for real (CI), rather than skip when the
/// machine lacks something.
pub fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false")
}

/// A database of its own on the PostgreSQL server whose URL is `base` (any
/// database on it, usually `postgres`): a test or benchmark run starts from
/// an empty schema whatever earlier runs left on the server. Answers the new
/// database's URL; [`drop_postgres_database`] removes it.
pub async fn fresh_postgres_database(base: &str) -> Result<String, String> {
    let (prefix, _) = base
        .rsplit_once('/')
        .ok_or_else(|| format!("{base}: no database in the URL"))?;
    // Lower case: PostgreSQL folds unquoted names.
    let name = format!("corral_{}", &corral_actors::domain::new_id("t")[2..]).to_lowercase();
    administer(base, &format!("CREATE DATABASE {name}")).await?;
    Ok(format!("{prefix}/{name}"))
}

/// Drops a database [`fresh_postgres_database`] made, closing whatever
/// connections to it are still open.
pub async fn drop_postgres_database(base: &str, url: &str) -> Result<(), String> {
    let (_, name) = url
        .rsplit_once('/')
        .ok_or_else(|| format!("{url}: no database in the URL"))?;
    administer(
        base,
        &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
    )
    .await
}

/// Runs one statement on the server `base` names, on a connection of its own.
async fn administer(base: &str, sql: &str) -> Result<(), String> {
    use sea_orm::ConnectionTrait;
    let admin = sea_orm::Database::connect(base)
        .await
        .map_err(|e| format!("connect to {base}: {e}"))?;
    let done = admin
        .execute_unprepared(sql)
        .await
        .map(|_| ())
        .map_err(|e| format!("{sql}: {e}"));
    let _ = admin.close().await;
    done
}

/// A PostgreSQL cluster of a test's own, which the test can stop and start
/// again (a database outage). Needs PostgreSQL's server binaries
/// (`scripts/install-deps` installs them); run as root, the server runs as
/// the `postgres` user, as PostgreSQL requires.
pub struct PgCluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    pub port: u16,
}

impl PgCluster {
    /// Starts a fresh cluster, or says why it cannot.
    pub async fn start() -> Result<Self, String> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .map_err(|_| "PostgreSQL server binaries are not installed".to_string())?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").exists())
            .max()
            .ok_or("PostgreSQL's initdb is not installed")?;
        let dir = tempfile::Builder::new()
            .prefix("corral-pg-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let root = running_as_root();
        if root {
            let status = std::process::Command::new("chown")
                .arg("-R")
                .arg("postgres")
                .arg(dir.path())
                .status()
                .map_err(|e| format!("chown: {e}"))?;
            if !status.success() {
                return Err("cannot hand the cluster directory to the postgres user".into());
            }
        }
        let cluster = Self {
            bin,
            dir,
            port: free_port(),
        };
        let data = cluster.dir.path().join("data");
        cluster
            .run(
                "initdb",
                &[
                    "-D",
                    &data.to_string_lossy(),
                    "-U",
                    "postgres",
                    "--auth=trust",
                ],
            )
            .await?;
        cluster.resume().await?;
        Ok(cluster)
    }

    async fn run(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let exe = self.bin.join(tool);
        let mut command = if running_as_root() {
            let mut c = tokio::process::Command::new("runuser");
            c.arg("-u").arg("postgres").arg("--").arg(&exe);
            c
        } else {
            tokio::process::Command::new(&exe)
        };
        let out = command
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| format!("{tool}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{tool} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server at once, as a crash or a network cut would.
    pub async fn interrupt(&self) -> Result<(), String> {
        let data = self.dir.path().join("data");
        self.run(
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        )
        .await
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub async fn resume(&self) -> Result<(), String> {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("log");
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-l",
                &log.to_string_lossy(),
                "-w",
                "-o",
                &options,
                "start",
            ],
        )
        .await
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let exe = self.bin.join("pg_ctl");
        let mut command = if running_as_root() {
            let mut c = std::process::Command::new("runuser");
            c.arg("-u").arg("postgres").arg("--").arg(&exe);
            c
        } else {
            std::process::Command::new(&exe)
        };
        let _ = command
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Why the runc tests cannot run on this machine, if they cannot: they need
/// root, runc on PATH and a static busybox.
pub fn runc_missing_prerequisite() -> Option<String> {
    container_missing_prerequisite("runc", "runc is not installed")
}

/// What every container runtime test needs: root, the runtime's binary and
/// a static busybox to build the image from.
fn container_missing_prerequisite(binary: &str, missing: &str) -> Option<String> {
    if !running_as_root() {
        return Some("not running as root".into());
    }
    if which(binary).is_none() {
        return Some(missing.into());
    }
    if !std::path::Path::new("/bin/busybox").exists()
        && !std::path::Path::new("/usr/bin/busybox").exists()
    {
        return Some("busybox-static is not installed".into());
    }
    None
}

/// Whether a runc test must skip: it says so (`SKIPPED:`) outside CI, and
/// fails in CI, where the prerequisites are installed.
pub fn skip_without_runc(test: &str) -> bool {
    skip_without_runtime(test, "runc")
}

/// Why the docker tests cannot run on this machine, if they cannot: they
/// need root, a static busybox and a Docker engine that answers.
pub fn docker_missing_prerequisite() -> Option<String> {
    if let Some(missing) =
        container_missing_prerequisite("docker", "the docker CLI is not installed")
    {
        return Some(missing);
    }
    let answered = std::process::Command::new("docker")
        .args(["version", "--format", "{{.Server.APIVersion}}"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !answered {
        return Some("no Docker engine answers".into());
    }
    None
}

/// Whether a test on `runtime` ("runc" or "docker") must skip: it says so
/// (`SKIPPED:`) outside CI, and fails in CI.
pub fn skip_without_runtime(test: &str, runtime: &str) -> bool {
    let missing = match runtime {
        "docker" => docker_missing_prerequisite(),
        _ => runc_missing_prerequisite(),
    };
    match missing {
        None => false,
        Some(reason) => {
            assert!(!required(), "CI must run {test} on {runtime}: {reason}");
            eprintln!("SKIPPED: {test} on {runtime}: {reason}");
            true
        }
    }
}

/// Whether this process runs as root.
pub fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.exists())
    })
}

/// A container as `runc list --format json` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct RuncContainer {
    pub id: String,
    pub status: String,
    /// The init process (0 once stopped).
    #[serde(default)]
    pub pid: i64,
}

/// The real stack as separate processes: `corral server` on SQLite in a
/// temporary directory and one `corral-agent` on a real container runtime
/// (runc by default, or docker) with its own data directory, plus an org
/// (its key in `api`) and the host token the agent uses. Either process can
/// be killed with SIGKILL and started again on the same ports and data
/// directories. Dropping the stack kills both and removes every container
/// (and overlay mount) the agent left behind. On docker, the agent works in
/// a namespace of the stack's own, so stacks never see each other's
/// containers on the shared engine.
pub struct RuncStack {
    /// "runc" or "docker".
    pub runtime: &'static str,
    /// The docker runtime's namespace (label and container-name prefix).
    pub docker_namespace: String,
    pub dir: tempfile::TempDir,
    pub http_port: u16,
    pub grpc_port: u16,
    pub admin: Api,
    pub api: Api,
    pub host_id: String,
    host_token: String,
    /// Extra environment of the agent process (its `CORRAL_AGENT_*`
    /// settings), applied at every start.
    agent_env: Vec<(String, String)>,
    /// Extra environment of the server process.
    server_env: Vec<(String, String)>,
    server: Option<ChildProcess>,
    agent: Option<ChildProcess>,
}

/// How long a process gets to come up (binaries are debug builds on a
/// machine that may be busy).
const STARTUP: Duration = Duration::from_secs(20);

impl RuncStack {
    /// Starts the server, makes an org, a host token and the busybox image,
    /// starts the agent on runc and waits until its host is `ready`.
    pub async fn start() -> Self {
        Self::start_with_agent_env(&[]).await
    }

    /// [`Self::start`], with extra environment for the agent process.
    pub async fn start_with_agent_env(agent_env: &[(&str, &str)]) -> Self {
        Self::start_on("runc", agent_env).await
    }

    /// [`Self::start`] on `runtime` ("runc" or "docker"), with extra
    /// environment for the agent process.
    pub async fn start_on(runtime: &'static str, agent_env: &[(&str, &str)]) -> Self {
        Self::start_with_env(runtime, &[], agent_env).await
    }

    /// [`Self::start_on`], with extra environment for the server process
    /// too (its `CORRAL_*` settings), applied at every start.
    pub async fn start_with_env(
        runtime: &'static str,
        server_env: &[(&str, &str)],
        agent_env: &[(&str, &str)],
    ) -> Self {
        assert!(
            matches!(runtime, "runc" | "docker"),
            "unknown runtime {runtime}"
        );
        init_logging();
        let dir = tempfile::tempdir().expect("a temp dir");
        let (http_port, grpc_port) = (free_port(), free_port());
        let base = format!("http://127.0.0.1:{http_port}");
        let admin = Api::new(&base, ADMIN_TOKEN);
        let mut stack = Self {
            runtime,
            docker_namespace: format!("e2e{:012x}", fastrand_u64() >> 16),
            dir,
            http_port,
            grpc_port,
            api: admin.clone(),
            admin,
            host_id: String::new(),
            host_token: String::new(),
            agent_env: agent_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            server_env: server_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            server: None,
            agent: None,
        };
        stack.start_server().await;

        let (status, org) = stack
            .admin
            .post(
                "/v1/admin/orgs",
                json!({"name": "runc", "credits_micros": TEST_CREDITS_MICROS}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{org}");
        stack.api = Api::new(&base, org["api_key"]["secret"].as_str().expect("key"));
        let (status, token) = stack
            .admin
            .post("/v1/admin/host-tokens", json!({"name": "runc-host"}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{token}");
        stack.host_id = token["host_id"].as_str().expect("host id").to_string();
        stack.host_token = token["token"].as_str().expect("token").to_string();

        let mut build = tokio::process::Command::new(binary("corral-agent"));
        build
            .arg("image")
            .arg("build-busybox")
            .arg("--data-dir")
            .arg(stack.agent_dir())
            .stdout(std::process::Stdio::null());
        if runtime == "docker" {
            build.arg("--docker");
        }
        let built = build
            .status()
            .await
            .expect("run corral-agent image build-busybox");
        assert!(built.success(), "the busybox image builds");

        stack.start_agent().await;
        stack
    }

    /// The agent's data directory (images, bundles, runc state).
    pub fn agent_dir(&self) -> PathBuf {
        self.dir.path().join("agent")
    }

    /// The runc state root the agent uses (`<data dir>/runc`).
    pub fn runc_root(&self) -> PathBuf {
        self.agent_dir().join("runc")
    }

    /// The bundle directory of a sandbox on the host.
    pub fn bundle_dir(&self, id: &str) -> PathBuf {
        self.agent_dir().join("sandboxes").join(id)
    }

    /// Starts `corral server` (same ports and data directory every time)
    /// and waits until it answers `/readyz`.
    pub async fn start_server(&mut self) {
        assert!(self.server.is_none(), "the server is already running");
        let server = ChildProcess::spawn(
            "corral server",
            tokio::process::Command::new(binary("corral"))
                .arg("server")
                .arg("--http-addr")
                .arg(format!("127.0.0.1:{}", self.http_port))
                .arg("--grpc-addr")
                .arg(format!("127.0.0.1:{}", self.grpc_port))
                .arg("--data-dir")
                .arg(self.dir.path().join("cp"))
                .arg("--heartbeat-ms")
                .arg("500")
                // By environment, so that `server_env` can change it.
                .env("CORRAL_STOP_GRACE_MS", "3000")
                .env("CORRAL_ADMIN_TOKEN", ADMIN_TOKEN)
                .env_remove("DATABASE_URL")
                .envs(self.server_env.iter().cloned()),
        );
        self.server = Some(server);
        wait_ready(&self.admin.base, STARTUP).await;
    }

    /// Starts `corral-agent run --runtime <runtime>` over the same data
    /// directory (and docker namespace) and waits until its host is `ready`.
    pub async fn start_agent(&mut self) {
        assert!(self.agent.is_none(), "the agent is already running");
        let agent = ChildProcess::spawn(
            "corral-agent",
            tokio::process::Command::new(binary("corral-agent"))
                .env("CORRAL_AGENT_DOCKER_NAMESPACE", &self.docker_namespace)
                // No registry is reachable: only local images.
                .env("CORRAL_AGENT_DOCKER_PULL_TIMEOUT_SECS", "0")
                .arg("run")
                .arg("--control-plane")
                .arg(format!("http://127.0.0.1:{}", self.grpc_port))
                .arg("--token")
                .arg(&self.host_token)
                .arg("--data-dir")
                .arg(self.agent_dir())
                .arg("--runtime")
                .arg(self.runtime)
                .arg("--cpus")
                .arg("8")
                .arg("--memory-mb")
                .arg("8192")
                .arg("--hostname")
                .arg(format!("{}-host", self.runtime))
                .arg("--poll-interval-ms")
                .arg("200")
                .envs(self.agent_env.iter().cloned())
                // Its own process group, as under a service manager, so it
                // can be killed together with the runc processes it runs.
                .process_group(0),
        );
        self.agent = Some(agent);
        self.wait_host_state("ready", STARTUP).await;
    }

    /// Kills the server with SIGKILL and reaps it: no shutdown runs.
    pub async fn kill_server(&mut self) {
        let mut server = self.server.take().expect("the server is running");
        server.kill_hard().await;
    }

    /// Kills the agent with SIGKILL and reaps it: no shutdown runs, and the
    /// runc processes it started are left as they are. With the server up,
    /// waits until it has noticed (the host row is no longer `ready`), so
    /// that a later `ready` is the new agent's.
    pub async fn kill_agent(&mut self) {
        let mut agent = self.agent.take().expect("the agent is running");
        agent.kill_hard().await;
        if self.server.is_some() {
            wait_for(
                "the control plane to notice the agent is gone",
                Duration::from_secs(5),
                || async { (self.host().await["state"] != "ready").then_some(()) },
            )
            .await;
        }
    }

    /// Kills the agent and every process it started that is still in its
    /// process group (runc commands in flight, not the containers), with
    /// SIGKILL, as a service manager stopping its unit would.
    pub async fn kill_agent_and_its_runc(&mut self) {
        let agent = self.agent.as_ref().expect("the agent is running");
        let pid = agent.child.id().expect("the agent has not exited");
        let killed = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .status()
            .expect("kill");
        assert!(killed.success(), "kill -KILL -{pid}");
        self.kill_agent().await;
    }

    /// This host's row as `GET /v1/admin/hosts` shows it.
    pub async fn host(&self) -> Value {
        let (status, hosts) = self.admin.get("/v1/admin/hosts").await;
        assert_eq!(status, StatusCode::OK, "{hosts}");
        hosts["hosts"]
            .as_array()
            .and_then(|hosts| hosts.iter().find(|h| h["id"] == self.host_id.as_str()))
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Waits until this host's row is in `state`.
    pub async fn wait_host_state(&self, state: &str, timeout: Duration) -> Value {
        wait_for(&format!("the host to be {state}"), timeout, || async {
            let host = self.host().await;
            (host["state"] == state).then_some(host)
        })
        .await
    }

    /// `GET /v1/sandboxes/{id}`.
    pub async fn sandbox(&self, id: &str) -> Value {
        let (status, sandbox) = self.api.get(&format!("/v1/sandboxes/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{sandbox}");
        sandbox
    }

    /// Waits until sandbox `id` is in `state`.
    pub async fn wait_sandbox_state(&self, id: &str, state: &str, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let sandbox = self.sandbox(id).await;
            if sandbox["state"] == state {
                return sandbox;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {timeout:?} waiting for sandbox {id} to be {state}; it is {sandbox}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The containers the runtime holds for the agent (runc: in its root;
    /// docker: in its namespace), sorted by id. Docker states are given in
    /// runc's words ("exited" is "stopped").
    pub async fn containers(&self) -> Vec<RuncContainer> {
        if self.runtime == "docker" {
            return docker_containers(&self.docker_namespace).await;
        }
        let out = tokio::process::Command::new("runc")
            .arg("--root")
            .arg(self.runc_root())
            .args(["list", "--format", "json"])
            .output()
            .await
            .expect("runc list");
        assert!(
            out.status.success(),
            "runc list: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // An empty root prints `null`.
        let mut list: Vec<RuncContainer> =
            serde_json::from_slice::<Option<Vec<RuncContainer>>>(&out.stdout)
                .expect("runc list prints JSON")
                .unwrap_or_default();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list
    }

    /// Asserts the host holds exactly `expected` (id, runc status) pairs:
    /// no duplicate, no orphan, nothing missing.
    pub async fn assert_containers(&self, expected: &[(&str, &str)]) {
        let mut expected: Vec<(String, String)> = expected
            .iter()
            .map(|(id, status)| (id.to_string(), status.to_string()))
            .collect();
        expected.sort();
        let actual: Vec<(String, String)> = self
            .containers()
            .await
            .into_iter()
            .map(|c| (c.id, c.status))
            .collect();
        assert_eq!(actual, expected, "the containers on the host");
    }

    /// `runc kill <id> <signal>` (or `docker kill --signal`) behind the
    /// agent's back.
    pub async fn runc_kill(&self, id: &str, signal: &str) {
        if self.runtime == "docker" {
            let out = tokio::process::Command::new("docker")
                .args(["kill", "--signal", signal])
                .arg(format!("{}-{id}", self.docker_namespace))
                .output()
                .await
                .expect("docker kill");
            assert!(
                out.status.success(),
                "docker kill: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        let out = tokio::process::Command::new("runc")
            .arg("--root")
            .arg(self.runc_root())
            .args(["kill", id, signal])
            .output()
            .await
            .expect("runc kill");
        assert!(
            out.status.success(),
            "runc kill: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for RuncStack {
    fn drop(&mut self) {
        // The agent first, so it does not react to the clean-up.
        for process in [self.agent.as_mut(), self.server.as_mut()]
            .into_iter()
            .flatten()
        {
            let _ = process.child.start_kill();
        }
        if self.runtime == "docker" {
            remove_docker_namespace(&self.docker_namespace);
            return;
        }
        let root = self.runc_root();
        let listed = std::process::Command::new("runc")
            .arg("--root")
            .arg(&root)
            .args(["list", "--quiet"])
            .output();
        if let Ok(out) = listed {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = std::process::Command::new("runc")
                    .arg("--root")
                    .arg(&root)
                    .args(["delete", "--force", id])
                    .output();
            }
        }
        // Overlay mounts would keep the temp dir from being removed.
        let sandboxes = self.agent_dir().join("sandboxes");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        if let Ok(entries) = std::fs::read_dir(&sandboxes) {
            for entry in entries.filter_map(|e| e.ok()) {
                let rootfs = entry.path().join("rootfs");
                let mounted = rootfs
                    .canonicalize()
                    .ok()
                    .and_then(|p| p.to_str().map(str::to_string))
                    .is_some_and(|p| mounts.lines().any(|l| l.split(' ').nth(4) == Some(&p)));
                if mounted {
                    let _ = std::process::Command::new("umount")
                        .arg("-l")
                        .arg(&rootfs)
                        .output();
                }
            }
        }
    }
}

/// A random u64 (no extra dependency: the std hasher's random keys).
pub fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}

/// The containers of a docker namespace as [`RuncContainer`]s: the sandbox
/// id from its label, the state in runc's words, the main process's pid.
pub async fn docker_containers(namespace: &str) -> Vec<RuncContainer> {
    let ids = tokio::process::Command::new("docker")
        .args(["ps", "-aq", "--filter"])
        .arg(format!("label=corral.namespace={namespace}"))
        .output()
        .await
        .expect("docker ps");
    assert!(
        ids.status.success(),
        "docker ps: {}",
        String::from_utf8_lossy(&ids.stderr)
    );
    let ids: Vec<String> = String::from_utf8_lossy(&ids.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    if ids.is_empty() {
        return Vec::new();
    }
    let out = tokio::process::Command::new("docker")
        .arg("inspect")
        .args(&ids)
        .output()
        .await
        .expect("docker inspect");
    // A container removed between the two calls makes inspect fail: ask
    // again.
    if !out.status.success() {
        return Box::pin(docker_containers(namespace)).await;
    }
    let inspected: Vec<Value> = serde_json::from_slice(&out.stdout).expect("docker inspect JSON");
    let mut list: Vec<RuncContainer> = inspected
        .iter()
        .map(|c| RuncContainer {
            id: c["Config"]["Labels"]["corral.sandbox_id"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            status: match c["State"]["Status"].as_str().unwrap_or_default() {
                "exited" | "dead" => "stopped".to_string(),
                other => other.to_string(),
            },
            pid: c["State"]["Pid"].as_i64().unwrap_or_default(),
        })
        .collect();
    list.sort_by(|a, b| a.id.cmp(&b.id));
    list
}

/// Removes every container of a docker namespace (clean-up; errors ignored).
pub fn remove_docker_namespace(namespace: &str) {
    let listed = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter"])
        .arg(format!("label=corral.namespace={namespace}"))
        .output();
    if let Ok(out) = listed {
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect();
        if !ids.is_empty() {
            let _ = std::process::Command::new("docker")
                .args(["rm", "-f"])
                .args(&ids)
                .output();
        }
    }
}
