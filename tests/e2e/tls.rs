//! Mutual TLS between a router and expert nodes, end to end with real processes and
//! certificates generated at test time: a router and two nodes on the cluster CA serve the golden
//! ids; a node refuses a plaintext client, a client without a certificate, a client whose
//! certificate comes from another CA, and one whose SAN is not on its allowed list (a cluster
//! client with an allowed SAN is the control); a router refuses a node whose certificate it
//! cannot verify (at start-up, and as a 503 naming TLS once a node is replaced by an impostor),
//! and plaintext against TLS fails with a clear error rather than a hang, both ways.

pub mod harness;
pub mod pki;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use harness::*;
use moe_meta::tls::ClusterTls;
use moe_proto::ExpertServiceClient;
use moe_proto::pb::InfoRequest;
use pki::{Leaf, Pki, s};
use reqwest::StatusCode;
use serde_json::json;

const MODEL: &str = "tiny-dsv3";
const ROUTER_SAN: &str = "router.moe.test";

/// `--cluster-tls-*` flags for `leaf` on `ca`.
fn tls_flags<'a>(ca: &'a Pki, leaf: &'a Leaf) -> Vec<&'a str> {
    vec![
        "--cluster-tls-ca",
        s(&ca.ca),
        "--cluster-tls-cert",
        s(&leaf.cert),
        "--cluster-tls-key",
        s(&leaf.key),
    ]
}

/// An mTLS node hosting `experts`, accepting only the router's SAN, its log kept; `listen` pins
/// the port.
fn node(ca: &Pki, leaf: &Leaf, experts: &str, listen: Option<&str>) -> Logged {
    let mut cmd = Command::new(moe_bin());
    cmd.args(["expert-node", "--model"])
        .arg(fixture(MODEL))
        .args([
            "--experts",
            experts,
            "--listen",
            listen.unwrap_or("127.0.0.1:0"),
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(tls_flags(ca, leaf))
        .args(["--cluster-tls-allowed-san", ROUTER_SAN])
        .env("MOE_LOG", "warn");
    spawn_logged(cmd)
}

/// The node's connections refused by its TLS listener, by reason, from its `/metrics`.
async fn refused(c: &reqwest::Client, node: &Logged) -> HashMap<String, f64> {
    let line = node
        .lines
        .recv_timeout(Duration::from_secs(30))
        .expect("the node prints its metrics address");
    let addr = line.rsplit(' ').next().expect("address");
    metric_values(c, addr)
        .await
        .into_iter()
        .filter_map(|(k, v)| {
            let reason = k.strip_prefix("moe_node_tls_connections_refused_total{")?;
            Some((
                reason
                    .split("reason=\"")
                    .nth(1)?
                    .trim_end_matches("\"}")
                    .to_string(),
                v,
            ))
        })
        .collect()
}

/// `Info` on the node at `addr` as a client with `tls` (or plaintext): the node id, or why not.
/// Bounded, so a hang fails the test instead of stalling it.
async fn info(addr: &str, tls: Option<&ClusterTls>) -> Result<String, String> {
    let call = async {
        let ep = moe_router::dispatch::client::endpoint(addr, tls).map_err(|s| s.to_string())?;
        let channel = ep.connect().await.map_err(|e| format!("connect: {e:?}"))?;
        let mut c = ExpertServiceClient::new(channel);
        c.info(InfoRequest {})
            .await
            .map(|r| r.into_inner().node_id)
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    };
    tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .map_err(|_| "no answer within 20 s (a hang)".to_string())?
}

fn client(ca: &Pki, leaf: &Leaf) -> ClusterTls {
    ClusterTls {
        ca: ca.ca.clone(),
        cert: leaf.cert.clone(),
        key: leaf.key.clone(),
        allowed_sans: vec![],
    }
}

async fn greedy(c: &reqwest::Client, router: &Proc) -> (StatusCode, serde_json::Value) {
    let g = golden(MODEL);
    let body = json!({"prompt": ids(&g["prompts"][2]["ids"]), "max_tokens": 24, "temperature": 0,
                      "ignore_eos": true, "logprobs": 0, "return_tokens_as_token_ids": true});
    post(c, &url(router, "/v1/completions"), &body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_router_and_nodes_serve_golden_ids_and_refuse_strangers() {
    let ca = Pki::new("moe cluster CA");
    let other = Pki::new("some other CA");
    let node_leaf = ca.issue("node", &["127.0.0.1", "localhost"]);
    let router_leaf = ca.issue("router", &[ROUTER_SAN]);
    let n0 = node(&ca, &node_leaf, "1-3:0-127", None);
    let n1 = node(&ca, &node_leaf, "1-3:128-255", None);

    let addrs = format!("{},{}", n0.proc.addr, n1.proc.addr);
    let mut cmd = Command::new(moe_bin());
    cmd.args(["router", "--listen", "127.0.0.1:0", "--model"])
        .arg(fixture(MODEL))
        .args(["--experts-at", &addrs, "--wire", "f32"])
        .args(tls_flags(&ca, &router_leaf));
    let router = spawn_logged(cmd);
    let c = reqwest::Client::new();
    let (status, resp) = greedy(&c, &router.proc).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let got: Vec<u64> = resp["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(token_id)
        .collect();
    assert_eq!(
        got,
        ids(&golden(MODEL)["results"][2]["generated_ids"]),
        "over mutual TLS the router serves the golden continuation"
    );

    // The control: a cluster client with the allowed SAN is served.
    let ok = info(&n0.proc.addr, Some(&client(&ca, &router_leaf))).await;
    assert!(ok.is_ok(), "a cluster client is served: {ok:?}");
    // Plaintext, no client certificate, another CA, a SAN not on the list: refused by the
    // handshake (the node logs why; the client sees its call fail, never a hang).
    let n0_addr = n0.proc.addr.clone();
    let n0_log = &n0;
    let n0 = &n0.proc;
    let plain = info(&n0.addr, None).await;
    let no_cert = {
        let bare = ca.issue("bare", &[ROUTER_SAN]);
        // A client config that trusts the CA but presents nothing: tonic's without identity.
        let ep = moe_router::dispatch::client::endpoint(&n0.addr, Some(&client(&ca, &bare)))
            .expect("endpoint")
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(ca.ca_pem())),
            )
            .expect("tls");
        let call = async {
            let ch = ep.connect().await.map_err(|e| format!("connect: {e:?}"))?;
            ExpertServiceClient::new(ch)
                .info(InfoRequest {})
                .await
                .map(|r| r.into_inner().node_id)
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        };
        tokio::time::timeout(Duration::from_secs(20), call)
            .await
            .unwrap_or_else(|_| Err("a hang".into()))
    };
    let stranger = info(
        &n0.addr,
        Some(&client(&ca, &other.issue("x", &[ROUTER_SAN]))),
    )
    .await;
    let wrong_san = info(
        &n0.addr,
        Some(&client(&ca, &ca.issue("coord", &["coordinator.moe"]))),
    )
    .await;
    for (what, r, logged) in [
        ("plaintext", &plain, "plaintext client on a TLS port"),
        (
            "no client certificate",
            &no_cert,
            "peer sent no certificates",
        ),
        ("another CA", &stranger, "UnknownIssuer"),
        (
            "SAN not allowed",
            &wrong_san,
            "names none of the allowed SANs",
        ),
    ] {
        // With TLS 1.3 the client's side of the handshake completes before the node has
        // judged its certificate, so the client sees the refusal as its call failing (tonic:
        // Unknown "transport error", Unavailable or Cancelled); the node says why.
        let e = r.as_ref().expect_err(what);
        eprintln!("{what}: {e}");
        assert!(!e.contains("a hang"), "{what}: {e}");
        assert!(
            n0_log.wait_log(logged, Duration::from_secs(5)),
            "{what}: the node logs `{logged}`; its log:\n{}",
            n0_log.log()
        );
    }
    assert_eq!(n0_addr, n0.addr);
    // Operators see the refusals without reading logs: the plaintext client (which its HTTP/2
    // stack may retry) and at least three failed handshakes (no certificate, another CA, a SAN
    // not allowed); nothing timed out.
    let by_reason = refused(&c, n0_log).await;
    let count = |r: &str| by_reason.get(r).copied().unwrap_or(-1.0);
    assert!(count("plaintext") >= 1.0, "{by_reason:?}");
    assert!(count("handshake") >= 3.0, "{by_reason:?}");
    assert_eq!(count("timeout"), 0.0, "{by_reason:?}");

    // A node replaced, on the same address, by one whose certificate is not the cluster's: the
    // router's next request fails with 503 and the router says why (TLS).
    let n1_addr = n1.proc.addr.clone();
    drop(n1);
    let impostor = other.issue("impostor", &["127.0.0.1", "localhost"]);
    let _n1b = node(&other, &impostor, "1-3:128-255", Some(&n1_addr));
    let (status, resp) = greedy(&c, &router.proc).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{resp}");
    assert!(
        router.wait_log("TLS handshake with node", Duration::from_secs(30)),
        "the router names the TLS failure; its log:\n{}",
        router.log()
    );
    eprintln!("503 body: {resp}");
}

/// `moe router` against `node` with `extra` flags: it must exit (not hang) with an error.
fn router_fails(node: &Proc, extra: &[&str]) -> String {
    let started = std::time::Instant::now();
    let mut cmd = Command::new(moe_bin());
    cmd.args(["router", "--listen", "127.0.0.1:0", "--model"])
        .arg(fixture(MODEL))
        .args(["--experts-at", &node.addr])
        .args(extra)
        .env("MOE_LOG", "warn");
    let out = cmd.output().expect("runs");
    eprintln!("router refused after {:?}", started.elapsed());
    assert!(!out.status.success(), "the router refuses to start");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "refused promptly, not after a hang"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn routers_refuse_nodes_they_cannot_verify_and_plaintext_mismatches_are_clear() {
    let ca = Pki::new("moe cluster CA");
    let other = Pki::new("some other CA");
    let router_leaf = ca.issue("router", &[ROUTER_SAN]);
    let flags = tls_flags(&ca, &router_leaf);

    // A node with a certificate from another CA.
    let impostor = other.issue("impostor", &["127.0.0.1"]);
    let n = node(&other, &impostor, "*:*", None);
    let e = router_fails(&n.proc, &flags);
    assert!(
        e.contains("TLS handshake with node") && e.contains("certificate"),
        "{e}"
    );
    // A cluster certificate that does not name the address dialled.
    let elsewhere = ca.issue("elsewhere", &["node-7.moe.test"]);
    let n = node(&ca, &elsewhere, "*:*", None);
    let e = router_fails(&n.proc, &flags);
    assert!(e.contains("TLS handshake with node"), "{e}");

    // A plaintext router against a TLS node, and a TLS router against a plaintext node.
    let good = ca.issue("node", &["127.0.0.1"]);
    let tls_node = node(&ca, &good, "*:*", None);
    let e = router_fails(&tls_node.proc, &[]);
    assert!(e.contains(&tls_node.proc.addr), "names the node: {e}");
    let plain_node = expert_node(&fixture(MODEL), &["--experts", "*:*"]);
    let e = router_fails(&plain_node, &flags);
    assert!(e.contains("TLS"), "names TLS: {e}");
}

#[test]
fn bad_tls_files_stop_a_node_at_start_with_the_file_named() {
    let ca = Pki::new("ca");
    let leaf = ca.issue("node", &["127.0.0.1"]);
    let garbage = ca.dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").expect("write");
    let m = fixture(MODEL);
    let run = |extra: &[&str]| {
        let mut args = vec!["expert-node", "--model", s(&m), "--experts", "*:*"];
        args.extend_from_slice(extra);
        let out = moe(&args);
        assert!(!out.status.success(), "refused: {extra:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(&[
        "--cluster-tls-ca",
        s(&ca.ca),
        "--cluster-tls-cert",
        s(&garbage),
        "--cluster-tls-key",
        s(&leaf.key),
    ]);
    assert!(
        e.contains("garbage.pem") && e.contains("holds no certificate"),
        "{e}"
    );
    let missing = ca.dir.path().join("missing.key");
    let e = run(&[
        "--cluster-tls-ca",
        s(&ca.ca),
        "--cluster-tls-cert",
        s(&leaf.cert),
        "--cluster-tls-key",
        s(&missing),
    ]);
    assert!(
        e.contains("missing.key") && e.contains("cannot read"),
        "{e}"
    );
    let e = run(&["--cluster-tls-cert", s(&leaf.cert)]);
    assert!(e.contains("--cluster-tls-ca"), "{e}");
}
