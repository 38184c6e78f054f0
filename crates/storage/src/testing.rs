//! Test support shared by this crate's tests and other crates' (feature `conformance`):
//! a real `redis-server` on a free port, started for a test and stopped with it.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A `redis-server` child process listening on 127.0.0.1 at a port of its own, killed on
/// drop; persistent (append-only file) only when asked.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    persistent: bool,
    /// The cluster bus port of a node started for [`RedisCluster`], `None` otherwise.
    cluster_bus: Option<u16>,
}

impl RedisServer {
    /// Starts `redis-server` (from `PATH`, or `REFLEX_REDIS_SERVER`), or `None` when it is
    /// not installed, so callers can print that they skipped.
    pub fn start() -> Option<Self> {
        Self::start_with(false, false)
    }

    /// Like [`start`](Self::start), but with an append-only file that redis writes before
    /// every reply, so the data survives [`restart`](Self::restart) (a `SIGKILL` of the
    /// server, not of the machine). It is never fsynced: on a busy CI disk an fsync per
    /// write took longer than the replicas' command timeout and failed unrelated steps.
    pub fn start_persistent() -> Option<Self> {
        Self::start_with(true, false)
    }

    fn start_with(persistent: bool, clustered: bool) -> Option<Self> {
        let binary = std::env::var("REFLEX_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        if !installed(&binary) {
            return None;
        }
        let dir = tempfile::tempdir().ok()?;
        let mut server = Self {
            child: None,
            port: 0,
            dir,
            persistent,
            // Redis's default bus port (port + 10000) can fall outside the port range.
            cluster_bus: clustered.then(reserve_free_port),
        };
        // Another process may take the port between choosing it and redis binding it;
        // then this redis exits (or someone else answers), and a new port is tried.
        for _ in 0..20 {
            server.port = reserve_free_port();
            if server.spawn(&binary).is_ok() {
                return Some(server);
            }
        }
        panic!("redis-server could not listen on any of 20 free ports");
    }

    /// Starts redis on `self.port` and waits until this very process answers there.
    fn spawn(&mut self, binary: &str) -> Result<(), String> {
        let child = Command::new(binary)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", ""])
            .args(if self.persistent {
                ["--appendonly", "yes", "--appendfsync", "no"]
            } else {
                ["--appendonly", "no", "--appendfsync", "no"]
            })
            .args(match self.cluster_bus {
                Some(bus) => vec![
                    "--cluster-enabled".to_owned(),
                    "yes".to_owned(),
                    "--cluster-port".to_owned(),
                    bus.to_string(),
                ],
                None => Vec::new(),
            })
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) => panic!("starting redis-server: {e}"),
        };
        let pid = child.id();
        self.child = Some(child);
        let answered = self.wait_listening(pid, Duration::from_secs(10));
        if answered.is_err() {
            self.stop();
        }
        answered
    }

    /// Waits until the redis answering on the port is the child with `pid`: a server of
    /// another test that got the same port would otherwise be mistaken for this one.
    fn wait_listening(&mut self, pid: u32, timeout: Duration) -> Result<(), String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("redis-server exited with {status}"));
            }
            match server_pid(addr) {
                Some(answered) if answered == pid => return Ok(()),
                Some(other) => {
                    return Err(format!(
                        "port {} is taken by another redis (pid {other})",
                        self.port
                    ));
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        Err(format!(
            "redis-server did not listen on {} within {timeout:?}",
            self.port
        ))
    }

    /// The `redis://` URL of this server.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory it runs in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the server (`SIGKILL`; without persistence its data is lost).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (`SIGSTOP`): connections stay open and commands queue unanswered,
    /// as in a long stall, until [`resume`](Self::resume).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a [`pause`](Self::pause)d server run again (`SIGCONT`); it then runs what queued.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, which: &str) {
        let Some(child) = &self.child else {
            panic!("signalling redis-server on port {}: not running", self.port);
        };
        let status = Command::new("kill")
            .args([which, &child.id().to_string()])
            .status();
        match status {
            Ok(s) if s.success() => {}
            other => panic!("kill {which} redis-server: {other:?}"),
        }
    }

    /// Starts it again on the same port after [`stop`](Self::stop).
    pub fn restart(&mut self) {
        self.stop();
        let binary = std::env::var("REFLEX_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        if let Err(e) = self.spawn(&binary) {
            panic!("restarting redis-server on port {}: {e}", self.port);
        }
    }
}

/// A Redis Cluster of three masters (no replicas), each a [`RedisServer`] of its own,
/// its 16384 slots spread by `redis-cli --cluster create`; killed on drop.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    /// The `redis-cli` binary (from `PATH`, or `REFLEX_REDIS_CLI`).
    cli: String,
}

impl RedisCluster {
    /// Starts the three nodes and forms the cluster, or `None` when `redis-server` or
    /// `redis-cli` is not installed, so callers can print that they skipped.
    pub fn start() -> Option<Self> {
        let cli = std::env::var("REFLEX_REDIS_CLI").unwrap_or_else(|_| "redis-cli".into());
        if !installed(&cli) {
            return None;
        }
        let nodes = (0..3)
            .map(|_| RedisServer::start_with(false, true))
            .collect::<Option<Vec<_>>>()?;
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let created = Command::new(&cli)
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output();
        match created {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => panic!("running redis-cli: {e}"),
        }
        let cluster = Self { nodes, cli };
        // Every node must have learnt the slot map before a client asks any of them.
        let start = Instant::now();
        for node in 0..cluster.nodes.len() {
            while !cluster
                .cli(node, &["cluster", "info"])
                .contains("cluster_state:ok")
            {
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "the cluster on {addrs:?} was not ready within 30 s"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Some(cluster)
    }

    /// How many nodes it has.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// `redis-cli ARGS…` against node `node`: its answer, trimmed (empty when it fails).
    pub fn cli(&self, node: usize, args: &[&str]) -> String {
        Command::new(&self.cli)
            .args(["-p", &self.nodes[node].port.to_string()])
            .args(args)
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .unwrap_or_default()
    }

    /// The `redis-cluster://` URL naming every node.
    pub fn url(&self) -> String {
        let mut url = format!("redis-cluster://127.0.0.1:{}", self.nodes[0].port);
        for (i, node) in self.nodes[1..].iter().enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(&format!("node=127.0.0.1:{}", node.port));
        }
        url
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether `binary --version` runs and succeeds.
fn installed(binary: &str) -> bool {
    Command::new(binary)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Ports handed to servers of this process. A stopped server keeps its port for
/// [`RedisServer::restart`], so no other test of the process may be given it meanwhile.
static RESERVED: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A port nothing listens on right now and that no other server of this process holds.
fn reserve_free_port() -> u16 {
    loop {
        let port = match TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
            Ok(addr) => addr.port(),
            Err(e) => panic!("finding a free port: {e}"),
        };
        let mut reserved = RESERVED
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if reserved.insert(port) {
            return port;
        }
    }
}

/// The `process_id` the redis listening at `addr` reports, or `None` when nothing answers.
fn server_pid(addr: SocketAddr) -> Option<u32> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(100)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    stream.write_all(b"INFO server\r\n").ok()?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        reply.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&reply);
        if let Some(rest) = text.split("process_id:").nth(1)
            && let Some((line, _)) = rest.split_once("\r\n")
        {
            return line.trim().parse().ok();
        }
    }
}
