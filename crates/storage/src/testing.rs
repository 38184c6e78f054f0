//! Test support shared by this crate's tests and other crates' (feature `conformance`):
//! a real `redis-server` on a free port, started for a test and stopped with it.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` child process listening on 127.0.0.1 at a port of its own, killed on
/// drop; persistent (append-only file) only when asked.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    persistent: bool,
}

impl RedisServer {
    /// Starts `redis-server` (from `PATH`, or `REFLEX_REDIS_SERVER`), or `None` when it is
    /// not installed, so callers can print that they skipped.
    pub fn start() -> Option<Self> {
        Self::start_with(false)
    }

    /// Like [`start`](Self::start), but with an append-only file fsynced on every write,
    /// so the data survives [`restart`](Self::restart).
    pub fn start_persistent() -> Option<Self> {
        Self::start_with(true)
    }

    fn start_with(persistent: bool) -> Option<Self> {
        let binary = std::env::var("REFLEX_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let installed = Command::new(&binary)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            return None;
        }
        let dir = tempfile::tempdir().ok()?;
        let mut server = Self {
            child: None,
            port: 0,
            dir,
            persistent,
        };
        server.port = free_port();
        server.spawn(&binary);
        Some(server)
    }

    fn spawn(&mut self, binary: &str) {
        let child = Command::new(binary)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", ""])
            .args(if self.persistent {
                ["--appendonly", "yes", "--appendfsync", "always"]
            } else {
                ["--appendonly", "no", "--appendfsync", "no"]
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
        self.child = Some(child);
        wait_listening(self.port, Duration::from_secs(10));
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

    /// Starts it again on the same port after [`stop`](Self::stop).
    pub fn restart(&mut self) {
        self.stop();
        let binary = std::env::var("REFLEX_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        self.spawn(&binary);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    match TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(addr) => addr.port(),
        Err(e) => panic!("finding a free port: {e}"),
    }
}

fn wait_listening(port: u16, timeout: Duration) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let start = Instant::now();
    while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
        assert!(
            start.elapsed() < timeout,
            "redis-server did not listen on {port} within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
