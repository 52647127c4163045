//! A real etcd on loopback for tests: `etcd` (Debian's `etcd-server`, installed by `.ci/run`)
//! started on free ports with temporary data directories, stopped on drop. [`EtcdCluster`] runs
//! several members (3 where a test is about etcd faults) and injects faults: kill a member
//! (SIGKILL), restart it on its data, freeze it (SIGSTOP) and thaw it (SIGCONT), and find the
//! raft leader. [`EtcdCluster::start_in`] runs each member inside a network namespace the test
//! made (`ip netns exec`), on that namespace's address, so a test can cut it off the network.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// One member of a test cluster.
#[derive(Debug)]
struct Member {
    name: String,
    /// The address it listens on, and the network namespace it runs in (None: this one).
    ip: String,
    netns: Option<String>,
    child: Option<Child>,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    frozen: bool,
}

/// Client TLS of a test etcd: it serves `https://` with `cert`/`key` and, with
/// `--client-cert-auth`, accepts only clients whose certificate chains to `ca`.
#[derive(Debug, Clone)]
pub struct EtcdTlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A running etcd cluster of one or more members.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    tls: Option<EtcdTlsFiles>,
}

impl EtcdCluster {
    /// Starts `n` members and waits until each accepts connections (panics with a clear message
    /// when the binary is missing: tests need it).
    pub fn start(n: usize) -> EtcdCluster {
        let hosts = (0..n).map(|_| (None, "127.0.0.1".to_string(), free_port(), free_port()));
        EtcdCluster::launch(hosts.collect())
    }

    /// Starts one member per `(network namespace, address)`, each run with `ip netns exec` and
    /// listening on that address (ports 2379 and 2380: the namespace is its own), and waits
    /// until each accepts connections from the calling thread's namespace.
    pub fn start_in(hosts: &[(String, String)]) -> EtcdCluster {
        let hosts = hosts
            .iter()
            .map(|(ns, ip)| (Some(ns.clone()), ip.clone(), 2379, 2380));
        EtcdCluster::launch(hosts.collect())
    }

    /// Starts `n` members whose clients must use TLS with a certificate of `tls.ca`.
    pub fn start_tls(n: usize, tls: EtcdTlsFiles) -> EtcdCluster {
        let hosts = (0..n).map(|_| (None, "127.0.0.1".to_string(), free_port(), free_port()));
        EtcdCluster::launch_with(hosts.collect(), Some(tls))
    }

    /// Starts one member per `(namespace, address, client port, peer port)`.
    fn launch(hosts: Vec<(Option<String>, String, u16, u16)>) -> EtcdCluster {
        EtcdCluster::launch_with(hosts, None)
    }

    fn launch_with(
        hosts: Vec<(Option<String>, String, u16, u16)>,
        tls: Option<EtcdTlsFiles>,
    ) -> EtcdCluster {
        let tag = format!("{}-{}", std::process::id(), free_port());
        let n = hosts.len();
        let members: Vec<Member> = hosts
            .into_iter()
            .enumerate()
            .map(|(i, (netns, ip, client_port, peer_port))| Member {
                name: format!("m{i}"),
                ip,
                netns,
                child: None,
                dir: std::env::temp_dir().join(format!("moe-etcd-{tag}-{i}")),
                client_port,
                peer_port,
                frozen: false,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://{}:{}", m.name, m.ip, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = EtcdCluster {
            members,
            initial_cluster,
            token: format!("moe-test-{tag}"),
            tls,
        };
        for i in 0..n {
            c.spawn(i);
        }
        for i in 0..n {
            c.wait_accepting(i);
        }
        c
    }

    fn spawn(&mut self, i: usize) {
        let (ic, token) = (self.initial_cluster.clone(), self.token.clone());
        let m = &mut self.members[i];
        let (c, q, ip) = (m.client_port, m.peer_port, &m.ip);
        // `ip netns exec` enters the namespace and execs etcd: the child is etcd itself.
        let mut cmd = match &m.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns, "etcd"]);
                cmd
            }
            None => Command::new("etcd"),
        };
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.cert)
                .arg("--key-file")
                .arg(&t.key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", &m.name, "--data-dir"])
            .arg(&m.dir)
            .args(["--listen-client-urls", &format!("{scheme}://{ip}:{c}")])
            .args(["--advertise-client-urls", &format!("{scheme}://{ip}:{c}")])
            .args(["--listen-peer-urls", &format!("http://{ip}:{q}")])
            .args(["--initial-advertise-peer-urls", &format!("http://{ip}:{q}")])
            .args(["--initial-cluster", &ic])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &token])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the `etcd` binary (Debian package etcd-server; .ci/run installs it)");
        m.child = Some(child);
        m.frozen = false;
    }

    fn wait_accepting(&self, i: usize) {
        let (ip, c) = (self.members[i].ip.as_str(), self.members[i].client_port);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect((ip, c)).is_err() {
            assert!(Instant::now() < deadline, "etcd did not start on {ip}:{c}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Every member's client URL, comma-separated (what `--etcd` takes).
    pub fn urls(&self) -> String {
        (0..self.len())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Member `i`'s client URL.
    pub fn url(&self, i: usize) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!(
            "{scheme}://{}:{}",
            self.members[i].ip, self.members[i].client_port
        )
    }

    /// Kills member `i` (SIGKILL) without removing its data.
    pub fn kill(&mut self, i: usize) {
        self.thaw(i);
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its ports and data (it rejoins the cluster).
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_accepting(i);
    }

    fn signal(&self, i: usize, sig: &str) {
        if let Some(c) = &self.members[i].child {
            let ok = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "kill {sig} of etcd member {i}");
        }
    }

    /// Freezes member `i` (SIGSTOP): its sockets stay open, nothing answers.
    pub fn freeze(&mut self, i: usize) {
        if !self.members[i].frozen {
            self.signal(i, "-STOP");
            self.members[i].frozen = true;
        }
    }

    /// Lets a frozen member run again (SIGCONT).
    pub fn thaw(&mut self, i: usize) {
        if self.members[i].frozen {
            self.signal(i, "-CONT");
            self.members[i].frozen = false;
        }
    }

    /// The raft leader's index, asked of every running member (None while there is none).
    pub async fn leader(&self) -> Option<usize> {
        for (i, m) in self.members.iter().enumerate() {
            if m.child.is_none() || m.frozen {
                continue;
            }
            let Ok(Ok(mut c)) = tokio::time::timeout(
                Duration::from_millis(500),
                etcd_client::Client::connect([self.url(i)], None),
            )
            .await
            else {
                continue;
            };
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(500), c.status()).await
                && s.header().is_some_and(|h| h.member_id() == s.leader())
            {
                return Some(i);
            }
        }
        None
    }

    /// Hands raft leadership to member `to` (etcd's MoveLeader, sent to the current leader).
    pub async fn move_leader(&self, to: usize) {
        let leader = self.wait_leader(Duration::from_secs(20)).await;
        if leader == to {
            return;
        }
        let mut target = etcd_client::Client::connect([self.url(to)], None)
            .await
            .expect("connect");
        let id = target
            .status()
            .await
            .expect("status")
            .header()
            .expect("header")
            .member_id();
        let mut c = etcd_client::Client::connect([self.url(leader)], None)
            .await
            .expect("connect");
        c.move_leader(id).await.expect("move leader");
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.leader().await != Some(to) {
            assert!(
                Instant::now() < deadline,
                "leadership did not move to m{to}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (up to `within`) until some running member leads, and returns it.
    pub async fn wait_leader(&self, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            if let Some(i) = self.leader().await {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "no etcd leader within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.len() {
            self.kill(i);
            let _ = std::fs::remove_dir_all(&self.members[i].dir);
        }
    }
}

/// A running single-member etcd.
#[derive(Debug)]
pub struct EtcdProcess {
    cluster: EtcdCluster,
    pub client_port: u16,
}

impl EtcdProcess {
    /// Starts etcd and waits until it accepts connections.
    pub fn start() -> EtcdProcess {
        let cluster = EtcdCluster::start(1);
        let client_port = cluster.members[0].client_port;
        EtcdProcess {
            cluster,
            client_port,
        }
    }

    /// Starts etcd serving clients over TLS with client-certificate authentication.
    pub fn start_tls(tls: EtcdTlsFiles) -> EtcdProcess {
        let cluster = EtcdCluster::start_tls(1, tls);
        let client_port = cluster.members[0].client_port;
        EtcdProcess {
            cluster,
            client_port,
        }
    }

    /// The client URL.
    pub fn url(&self) -> String {
        self.cluster.url(0)
    }

    /// Kills etcd (SIGKILL) without removing its data.
    pub fn kill(&mut self) {
        self.cluster.kill(0);
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.cluster.restart(0);
    }
}
