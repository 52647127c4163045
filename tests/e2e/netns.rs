//! A small network made of Linux network namespaces, for partition tests: a hub namespace
//! holding a bridge, and one namespace per host, each joined to the bridge by a veth pair.
//! Cutting a host takes its bridge port down (its packets are dropped, nothing is reset, like a
//! pulled cable); healing brings it back. Every address lives inside namespaces this lab made,
//! and they are deleted on drop. Needs root and iproute2 (`ip`).
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;

/// The namespaces of one test.
pub struct Lab {
    prefix: String,
    hub: String,
    hosts: Vec<String>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running `ip` (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Lab {
    /// A hub and `hosts` namespaces with addresses `10.77.0.{10 + i}/24`.
    pub fn create(hosts: usize) -> Result<Lab, String> {
        let prefix = format!("m{}", std::process::id() % 100_000);
        let mut lab = Lab {
            hub: format!("{prefix}hub"),
            hosts: Vec::new(),
            prefix,
        };
        ip(&["netns", "add", &lab.hub])?;
        ip(&["-n", &lab.hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &lab.hub, "link", "set", "br0", "up"])?;
        for i in 0..hosts {
            let ns = format!("{}h{i}", lab.prefix);
            ip(&["netns", "add", &ns])?;
            lab.hosts.push(ns.clone());
            let (inner, outer) = (format!("{ns}v"), lab.port(i));
            ip(&[
                "link", "add", &inner, "type", "veth", "peer", "name", &outer,
            ])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&["link", "set", &outer, "netns", &lab.hub])?;
            ip(&["-n", &lab.hub, "link", "set", &outer, "master", "br0"])?;
            ip(&["-n", &lab.hub, "link", "set", &outer, "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", lab.addr(i)),
                "dev",
                &inner,
            ])?;
            ip(&["-n", &ns, "link", "set", &inner, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(lab)
    }

    fn port(&self, i: usize) -> String {
        format!("{}h{i}p", self.prefix)
    }

    /// Host `i`'s namespace name.
    pub fn netns(&self, i: usize) -> &str {
        &self.hosts[i]
    }

    /// Host `i`'s address.
    pub fn addr(&self, i: usize) -> String {
        format!("10.77.0.{}", 10 + i)
    }

    /// Moves the calling thread into host `i`'s namespace: sockets it opens, threads it starts
    /// and processes it spawns from now on are on that host.
    pub fn enter(&self, i: usize) -> Result<(), String> {
        let path = format!("/run/netns/{}", self.hosts[i]);
        let f = File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        // SAFETY: setns on a valid namespace file descriptor; it changes only this thread.
        let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        if r == 0 {
            Ok(())
        } else {
            Err(format!("setns {path}: {}", std::io::Error::last_os_error()))
        }
    }

    /// Cuts host `i` off the network (its bridge port goes down).
    pub fn cut(&self, i: usize) {
        ip(&["-n", &self.hub, "link", "set", &self.port(i), "down"]).expect("cut");
    }

    /// Puts host `i` back on the network.
    pub fn heal(&self, i: usize) {
        ip(&["-n", &self.hub, "link", "set", &self.port(i), "up"]).expect("heal");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.hosts.iter().chain(std::iter::once(&self.hub)) {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
