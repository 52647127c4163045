//! The coordinated cluster on an etcd that serves clients over TLS with `--client-cert-auth`
//! (certificates generated at test time): a coordinator, two expert nodes and a router, every
//! one with an etcd client certificate and the data plane on mutual TLS, serve the golden ids;
//! a client with another CA's certificate, one with no certificate, and a plaintext one are
//! refused by etcd.

pub mod harness;
pub mod pki;
pub mod roles;

use std::time::Duration;

use moe_meta::store::MetaStore;
use moe_meta::store::etcd::{EtcdAuth, EtcdStore};
use moe_meta::testing::{EtcdProcess, EtcdTlsFiles};
use pki::{Pki, s};

use roles::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinated_cluster_on_etcd_with_tls_and_client_certificates() {
    let ca = Pki::new("moe test CA");
    let etcd_server = ca.issue("etcd", &["127.0.0.1", "localhost"]);
    let etcd = EtcdProcess::start_tls(EtcdTlsFiles {
        ca: ca.ca.clone(),
        cert: etcd_server.cert.clone(),
        key: etcd_server.key.clone(),
    });
    let url = etcd.url();
    assert!(url.starts_with("https://"), "{url}");
    let client = ca.issue("moe-client", &["moe.test"]);
    let node_leaf = ca.issue("node", &["127.0.0.1"]);
    let router_leaf = ca.issue("router", &["router.moe.test"]);
    let etcd_flags = [
        "--etcd-ca",
        s(&ca.ca),
        "--etcd-cert",
        s(&client.cert),
        "--etcd-key",
        s(&client.key),
    ];
    let with = |extra: &[&str], leaf: Option<&pki::Leaf>| -> Vec<String> {
        let mut v: Vec<String> = etcd_flags.iter().map(|x| x.to_string()).collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        if let Some(l) = leaf {
            for (f, p) in [
                ("--cluster-tls-ca", &ca.ca),
                ("--cluster-tls-cert", &l.cert),
                ("--cluster-tls-key", &l.key),
            ] {
                v.push(f.into());
                v.push(s(p).into());
            }
        }
        v
    };
    let c_args = with(&["--min-replicas", "2", "--rebalance-threshold", "0"], None);
    let c_args: Vec<&str> = c_args.iter().map(String::as_str).collect();
    let coord = coordinator_with(&url, &c_args);
    coord.expect_line("leading", Duration::from_secs(30));
    let n_args = with(
        &["--cluster-tls-allowed-san", "router.moe.test"],
        Some(&node_leaf),
    );
    let n_args: Vec<&str> = n_args.iter().map(String::as_str).collect();
    let _n0 = node_with(&url, "n0", &n_args);
    let _n1 = node_with(&url, "n1", &n_args);
    let r_args = with(&[], Some(&router_leaf));
    let r_args: Vec<&str> = r_args.iter().map(String::as_str).collect();
    let r = router_with(&url, &r_args);
    coord.expect_line("active (2 nodes", Duration::from_secs(60));
    let c = reqwest::Client::new();
    wait_ready(&c, &r.proc.addr).await;
    for i in PROMPTS {
        assert_eq!(
            greedy(&c, &r.proc.addr, i).await.expect("ok"),
            golden_ids(i),
            "prompt_{i} over etcd TLS and data-plane mTLS"
        );
    }

    // The control: the cluster's client certificate reads.
    let good = EtcdAuth::load(Some(&ca.ca), Some(&client.cert), Some(&client.key), None)
        .expect("credentials");
    let store = EtcdStore::connect_checked(&url, &good)
        .await
        .expect("a cluster client reads");
    assert!(store.get("/moe-health").await.is_ok());

    // Another CA's client certificate, no client certificate, plaintext: refused.
    let other = Pki::new("other CA");
    let stranger = other.issue("stranger", &["moe.test"]);
    let wrong = EtcdAuth::load(
        Some(&ca.ca),
        Some(&stranger.cert),
        Some(&stranger.key),
        None,
    )
    .expect("credentials");
    let no_cert = EtcdAuth::load(Some(&ca.ca), None, None, None).expect("credentials");
    let plain_url = url.replacen("https://", "http://", 1);
    for (what, u, auth) in [
        ("another CA", url.as_str(), &wrong),
        ("no client certificate", url.as_str(), &no_cert),
        ("plaintext", plain_url.as_str(), &EtcdAuth::default()),
    ] {
        let r = tokio::time::timeout(Duration::from_secs(30), EtcdStore::connect_checked(u, auth))
            .await
            .unwrap_or_else(|_| panic!("{what}: refused, not hung"));
        let e = r.expect_err(what).to_string();
        eprintln!("{what}: {e}");
        assert!(e.contains("unavailable"), "{what}: {e}");
    }
    // And etcd's own certificate is checked: a client trusting another CA refuses etcd.
    let distrust = EtcdAuth::load(Some(&other.ca), Some(&client.cert), Some(&client.key), None)
        .expect("credentials");
    let e = EtcdStore::connect_checked(&url, &distrust)
        .await
        .expect_err("etcd's certificate is not from this CA")
        .to_string();
    assert!(e.contains("certificate"), "{e}");
}
