//! A real etcd on loopback for tests: `etcd` (Debian's `etcd-server`, installed by `.ci/run`)
//! started on free ports with a temporary data directory, stopped on drop.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running single-member etcd.
#[derive(Debug)]
pub struct EtcdProcess {
    child: Option<Child>,
    dir: PathBuf,
    pub client_port: u16,
    peer_port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

impl EtcdProcess {
    /// Starts etcd and waits until it accepts connections (panics with a clear message when the
    /// binary is missing: tests need it).
    pub fn start() -> EtcdProcess {
        let dir =
            std::env::temp_dir().join(format!("moe-etcd-{}-{}", std::process::id(), free_port()));
        let mut p = EtcdProcess {
            child: None,
            dir,
            client_port: free_port(),
            peer_port: free_port(),
        };
        p.launch();
        p
    }

    fn launch(&mut self) {
        let (c, q) = (self.client_port, self.peer_port);
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(&self.dir)
            .args(["--listen-client-urls", &format!("http://127.0.0.1:{c}")])
            .args(["--advertise-client-urls", &format!("http://127.0.0.1:{c}")])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{q}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{q}"),
            ])
            .args(["--initial-cluster", &format!("t=http://127.0.0.1:{q}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the `etcd` binary (Debian package etcd-server; .ci/run installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", c)).is_err() {
            assert!(Instant::now() < deadline, "etcd did not start on port {c}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Kills etcd (SIGKILL) without removing its data.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
