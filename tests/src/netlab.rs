//! A small network of hosts on this machine, for tests that cross real
//! network boundaries: a Linux bridge in the root namespace carrying the
//! control plane's address, and one network namespace per host, joined to
//! the bridge by a veth pair, each with its own address on a private /24
//! picked at random (10.[200-249].x.0/24). Cutting a host's link (`ip link
//! set <veth> down` on the bridge side) partitions it; bringing it up heals.
//!
//! [`Fleet`] runs the real `corral server` (its gRPC on the bridge address)
//! and one `corral-agent` per host inside that host's namespace (`ip netns
//! exec`), on the process runtime, whose sandboxes are processes in the
//! host's namespace and outlive their agent. Everything made is removed on
//! drop, even after a panic: agents and server killed, every process left
//! in a namespace killed, the namespaces and the bridge deleted.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::{
    binary, free_port, required, running_as_root, wait_for, Api, ChildProcess, ADMIN_TOKEN,
};

/// Why the multi-host tests cannot run here, if they cannot: they need
/// root and `ip` (iproute2) with network namespace support.
pub fn netlab_missing_prerequisite() -> Option<String> {
    if !running_as_root() {
        return Some("not running as root".into());
    }
    let ip = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map_err(|e| e.to_string());
    match ip {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "`ip netns` does not work: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("`ip` (iproute2) is not installed: {e}")),
    }
}

/// Whether a multi-host test must skip: it says so (`SKIPPED:`) outside CI,
/// and fails in CI.
pub fn skip_without_netlab(test: &str) -> bool {
    match netlab_missing_prerequisite() {
        None => false,
        Some(reason) => {
            assert!(!required(), "CI must run {test}: {reason}");
            eprintln!("SKIPPED: {test}: {reason}");
            true
        }
    }
}

/// Runs `ip <args>`, panicking with its stderr on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip {}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// One host of the lab: a network namespace and its link to the bridge.
#[derive(Debug, Clone)]
pub struct LabHost {
    /// The network namespace's name.
    pub netns: String,
    /// The bridge side of its veth pair (down = partitioned).
    pub link: String,
    /// Its address on the lab network.
    pub addr: String,
}

/// The bridge and the hosts' namespaces; all removed on drop.
pub struct NetLab {
    pub bridge: String,
    /// The root namespace's address on the bridge (the control plane's).
    pub gateway: String,
    pub hosts: Vec<LabHost>,
}

impl NetLab {
    /// A bridge and `hosts` namespaces, each linked and addressed.
    pub fn new(hosts: usize) -> Self {
        let random = crate::fastrand_u64();
        let tag = format!("{:06x}", random & 0xff_ffff);
        let (a, b) = (200 + (random >> 24) % 50, (random >> 32) % 256);
        let mut lab = Self {
            bridge: format!("cb{tag}"),
            gateway: format!("10.{a}.{b}.1"),
            hosts: Vec::new(),
        };
        // Registered before it exists, so a failure half way is cleaned up.
        ip(&["link", "add", &lab.bridge, "type", "bridge"]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", lab.gateway),
            "dev",
            &lab.bridge,
        ]);
        ip(&["link", "set", &lab.bridge, "up"]);
        for i in 0..hosts {
            let host = LabHost {
                netns: format!("c{tag}h{i}"),
                link: format!("c{tag}v{i}"),
                addr: format!("10.{a}.{b}.{}", 10 + i),
            };
            let peer = format!("c{tag}p{i}");
            lab.hosts.push(host.clone());
            ip(&["netns", "add", &host.netns]);
            ip(&[
                "link", "add", &host.link, "type", "veth", "peer", "name", &peer,
            ]);
            ip(&["link", "set", &peer, "netns", &host.netns]);
            ip(&["link", "set", &host.link, "master", &lab.bridge, "up"]);
            let ns = host.netns.as_str();
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", host.addr),
                "dev",
                &peer,
            ]);
            ip(&["-n", ns, "link", "set", &peer, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        lab
    }

    /// Cuts host `i` off the network (its link goes down).
    pub fn partition(&self, i: usize) {
        ip(&["link", "set", &self.hosts[i].link, "down"]);
    }

    /// Brings host `i`'s link back.
    pub fn heal(&self, i: usize) {
        ip(&["link", "set", &self.hosts[i].link, "up"]);
    }

    /// The inode of host `i`'s network namespace (what
    /// `/proc/<pid>/ns/net` of a process in it points to).
    pub fn netns_inode(&self, i: usize) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/run/netns/{}", self.hosts[i].netns))
            .expect("the namespace's file")
            .ino()
    }

    /// Kills every process still in host `i`'s namespace.
    pub fn kill_all_in(&self, i: usize) {
        let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.hosts[i].netns])
            .output()
        else {
            return;
        };
        let pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter(|p| p.parse::<u32>().is_ok())
            .map(str::to_string)
            .collect();
        if !pids.is_empty() {
            let _ = Command::new("kill").arg("-KILL").args(&pids).output();
        }
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        for i in 0..self.hosts.len() {
            self.kill_all_in(i);
            // Deleting the namespace deletes the veth pair with it.
            let _ = Command::new("ip")
                .args(["netns", "del", &self.hosts[i].netns])
                .output();
            let _ = Command::new("ip")
                .args(["link", "del", &self.hosts[i].link])
                .output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

/// How long a process gets to come up.
const STARTUP: Duration = Duration::from_secs(20);

/// The control plane and one agent per lab host, as real processes.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub admin: Api,
    pub api: Api,
    pub grpc_url: String,
    /// Host id and token of each lab host, by index.
    pub host_ids: Vec<String>,
    tokens: Vec<String>,
    agents: Vec<Option<ChildProcess>>,
    server: Option<ChildProcess>,
    /// Declared last, so dropped after the processes.
    pub lab: NetLab,
}

impl Fleet {
    /// A lab of `hosts`, `corral server` with its gRPC on the bridge and
    /// `server_args`, an org, and an agent on every host, all `ready`.
    pub async fn start(hosts: usize, server_args: &[&str]) -> Self {
        crate::init_logging();
        let lab = NetLab::new(hosts);
        let dir = tempfile::tempdir().expect("a temp dir");
        let http_port = free_port();
        let grpc_addr = format!("{}:{}", lab.gateway, free_port());
        let base = format!("http://127.0.0.1:{http_port}");
        let server = ChildProcess::spawn(
            "corral server",
            tokio::process::Command::new(binary("corral"))
                .arg("server")
                .arg("--http-addr")
                .arg(format!("127.0.0.1:{http_port}"))
                .arg("--grpc-addr")
                .arg(&grpc_addr)
                // The bridge is a private namespace of this test: plaintext
                // there is deliberate (and the server refuses it otherwise).
                .arg("--allow-plaintext")
                .arg("--data-dir")
                .arg(dir.path().join("cp"))
                .args(server_args)
                .env("CORRAL_ADMIN_TOKEN", ADMIN_TOKEN)
                .env_remove("DATABASE_URL"),
        );
        let admin = Api::new(&base, ADMIN_TOKEN);
        crate::wait_ready(&base, STARTUP).await;
        let (status, org) = admin
            .post(
                "/v1/admin/orgs",
                json!({"name": "fleet", "credits_micros": crate::TEST_CREDITS_MICROS}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{org}");
        let api = Api::new(&base, org["api_key"]["secret"].as_str().expect("key"));
        let mut fleet = Self {
            dir,
            admin,
            api,
            grpc_url: format!("http://{grpc_addr}"),
            host_ids: Vec::new(),
            tokens: Vec::new(),
            agents: Vec::new(),
            server: Some(server),
            lab,
        };
        for i in 0..hosts {
            let (status, token) = fleet
                .admin
                .post(
                    "/v1/admin/host-tokens",
                    json!({"name": format!("host-{i}")}),
                )
                .await;
            assert_eq!(status, StatusCode::CREATED, "{token}");
            fleet
                .host_ids
                .push(token["host_id"].as_str().expect("host id").to_string());
            fleet
                .tokens
                .push(token["token"].as_str().expect("token").to_string());
            fleet.agents.push(None);
        }
        for i in 0..hosts {
            fleet.spawn_agent(i);
        }
        for i in 0..hosts {
            fleet.wait_host_state(i, "ready", STARTUP).await;
        }
        fleet
    }

    fn agent_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("agent-{i}"))
    }

    fn spawn_agent(&mut self, i: usize) {
        assert!(self.agents[i].is_none(), "agent {i} is already running");
        let agent = ChildProcess::spawn(
            &format!("corral-agent on host {i}"),
            tokio::process::Command::new("ip")
                // `ip netns exec` execs the agent: the pid is the agent's.
                .args(["netns", "exec", &self.lab.hosts[i].netns])
                .arg(binary("corral-agent"))
                .arg("run")
                .arg("--control-plane")
                .arg(&self.grpc_url)
                .arg("--token")
                .arg(&self.tokens[i])
                .arg("--data-dir")
                .arg(self.agent_dir(i))
                .args(["--runtime", "process", "--cpus", "1", "--memory-mb", "1024"])
                .arg("--hostname")
                .arg(format!("lab-host-{i}"))
                .args(["--poll-interval-ms", "200"]),
        );
        self.agents[i] = Some(agent);
    }

    /// Starts host `i`'s agent (again) and waits until the host is `ready`.
    pub async fn start_agent(&mut self, i: usize) {
        self.spawn_agent(i);
        self.wait_host_state(i, "ready", STARTUP).await;
    }

    /// Kills host `i`'s agent with SIGKILL (its sandboxes keep running).
    pub async fn kill_agent(&mut self, i: usize) {
        let mut agent = self.agents[i].take().expect("the agent is running");
        agent.kill_hard().await;
    }

    /// Host `i`'s row as the admin API shows it.
    pub async fn host(&self, i: usize) -> Value {
        let (status, hosts) = self.admin.get("/v1/admin/hosts").await;
        assert_eq!(status, StatusCode::OK, "{hosts}");
        hosts["hosts"]
            .as_array()
            .and_then(|hosts| hosts.iter().find(|h| h["id"] == self.host_ids[i].as_str()))
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Waits until host `i`'s row is in `state`.
    pub async fn wait_host_state(&self, i: usize, state: &str, timeout: Duration) -> Value {
        wait_for(&format!("host {i} to be {state}"), timeout, || async {
            let host = self.host(i).await;
            (host["state"] == state).then_some(host)
        })
        .await
    }

    /// The index of the lab host sandbox `id` runs on (the API does not
    /// show placement to an org): the host whose network namespace an exec
    /// in the sandbox answers from.
    pub async fn locate(&self, id: &str) -> usize {
        let inode = self.exec_netns_inode(id).await;
        (0..self.lab.hosts.len())
            .find(|i| self.lab.netns_inode(*i).to_string() == inode)
            .unwrap_or_else(|| panic!("sandbox {id} answers from no lab host ({inode})"))
    }

    async fn exec_netns_inode(&self, id: &str) -> String {
        let (status, out) = self
            .exec(id, json!(["stat", "-L", "-c", "%i", "/proc/self/ns/net"]))
            .await;
        assert_eq!(status, StatusCode::OK, "{out}");
        assert_eq!(out["exit_code"], 0, "{out}");
        out["stdout"]
            .as_str()
            .unwrap_or_default()
            .trim()
            .to_string()
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

    /// Runs `argv` in sandbox `id`; returns the HTTP status and the result.
    pub async fn exec(&self, id: &str, argv: Value) -> (StatusCode, Value) {
        self.api
            .post(
                &format!("/v1/sandboxes/{id}/exec"),
                json!({"argv": argv, "timeout_ms": 20_000}),
            )
            .await
    }

    /// Asserts sandbox `id` runs on lab host `i`: an exec in it answers
    /// from inside host `i`'s network namespace.
    pub async fn assert_runs_on(&self, id: &str, i: usize) {
        assert_eq!(
            self.exec_netns_inode(id).await,
            self.lab.netns_inode(i).to_string(),
            "sandbox {id} answers from host {i}'s network namespace"
        );
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for agent in self.agents.iter_mut().flatten() {
            let _ = agent.child.start_kill();
        }
        if let Some(server) = self.server.as_mut() {
            let _ = server.child.start_kill();
        }
        // The lab (its namespaces' processes included) goes with `lab`.
    }
}
