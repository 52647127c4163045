//! The API listener end to end, on `moe serve` processes over raw sockets: HTTPS with a test CA
//! (certificates generated at test time), a certificate replaced on disk reaching the next
//! connection, plain HTTP on the HTTPS port answered 400; header, body and idle timeouts;
//! connections per client IP; a client that half-closes after its request still answered.

pub mod harness;
pub mod pki;

use std::process::Command;
use std::time::{Duration, Instant};

use harness::*;
use pki::{Pki, get, https, s};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MODEL: &str = "tiny-dsv3";

fn serve_with(extra: &[&str]) -> Proc {
    let mut cmd = Command::new(moe_bin());
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--model"])
        .arg(fixture(MODEL))
        .args(extra);
    spawn_logged(cmd).proc
}

/// Everything the server sends until it closes (bounded: a server that never closes fails).
async fn read_to_close(tcp: &mut TcpStream, within: Duration) -> Result<String, String> {
    let mut out = Vec::new();
    tokio::time::timeout(within, tcp.read_to_end(&mut out))
        .await
        .map_err(|_| format!("still open after {within:?}"))?
        .or_else(|e| match e.kind() {
            // A refused connection may be reset rather than closed.
            std::io::ErrorKind::ConnectionReset => Ok(0),
            _ => Err(e.to_string()),
        })?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Reads one complete response (head and `content-length` body) from a kept-alive connection.
async fn read_response(tcp: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut chunk))
            .await
            .expect("an answer")
            .expect("read");
        assert!(
            n > 0,
            "closed before a full response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            if body.len() >= len {
                return text;
            }
        }
    }
}

const HEALTH_KEEP_ALIVE: &str = "GET /health HTTP/1.1\r\nhost: localhost\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_the_test_ca_and_a_certificate_replaced_on_disk() {
    let ca = Pki::new("api CA");
    let a = ca.issue("api", &["localhost", "127.0.0.1"]);
    let server = serve_with(&["--tls-cert", s(&a.cert), "--tls-key", s(&a.key)]);
    let ca_pem = ca.ca_pem();
    let first = https(&server.addr, "localhost", &ca_pem, &get("/health"))
        .await
        .expect("HTTPS works with the test CA");
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.server_cert, a.der(), "certificate A is served");
    let models = https(&server.addr, "127.0.0.1", &ca_pem, &get("/v1/models"))
        .await
        .expect("models");
    assert!(models.body.contains("tiny-dsv3"), "{}", models.body);

    // Another CA's client does not trust it.
    let other = Pki::new("other");
    let e = https(&server.addr, "localhost", &other.ca_pem(), &get("/health")).await;
    assert!(
        e.is_err_and(|e| e.contains("handshake")),
        "an untrusting client fails the handshake"
    );

    // Plain HTTP to the HTTPS port: a 400 that says so.
    let mut tcp = TcpStream::connect(&server.addr).await.expect("connect");
    tcp.write_all(get("/health").as_bytes())
        .await
        .expect("write");
    let answer = read_to_close(&mut tcp, Duration::from_secs(10))
        .await
        .expect("answered");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("https_required"), "{answer}");

    // Certificate B replaces A in the same files (key first, then certificate, as a secret
    // update may land them): a new connection sees B once the server has re-read the files.
    let b = ca.issue("api-b", &["localhost", "127.0.0.1"]);
    std::fs::copy(&b.key, &a.key).expect("key");
    std::fs::copy(&b.cert, &a.cert).expect("cert");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = https(&server.addr, "localhost", &ca_pem, &get("/health")).await;
        if let Ok(r) = &r
            && r.server_cert == b.der()
        {
            assert_eq!(r.status, 200);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "certificate B never served: {:?}",
            r.map(|r| r.status)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_are_cut_off_and_half_closers_answered() {
    let server = serve_with(&[
        "--header-read-timeout-ms",
        "300",
        "--body-timeout-ms",
        "300",
        "--idle-timeout-ms",
        "600",
    ]);
    let started = Instant::now();
    // Slowloris on the head: a request line and then nothing.
    let mut slow_head = TcpStream::connect(&server.addr).await.expect("connect");
    slow_head
        .write_all(b"GET /health HTTP/1.1\r\n")
        .await
        .expect("write");
    read_to_close(&mut slow_head, Duration::from_secs(10))
        .await
        .expect("the server closes a connection whose head never ends");

    // Slowloris on the body: 10 of 100 declared bytes, then nothing: 408.
    let mut slow_body = TcpStream::connect(&server.addr).await.expect("connect");
    slow_body
        .write_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"prompt\":")
        .await
        .expect("write");
    let answer = read_to_close(&mut slow_body, Duration::from_secs(10))
        .await
        .expect("answered and closed");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");

    // Idle after a request: closed.
    let mut idle = TcpStream::connect(&server.addr).await.expect("connect");
    idle.write_all(HEALTH_KEEP_ALIVE.as_bytes())
        .await
        .expect("write");
    assert!(read_response(&mut idle).await.starts_with("HTTP/1.1 200"));
    let rest = read_to_close(&mut idle, Duration::from_secs(10))
        .await
        .expect("an idle connection is closed");
    assert!(rest.is_empty(), "{rest}");
    assert!(started.elapsed() < Duration::from_secs(30));

    // Half-close: the request, then the write side shut; the answer still comes.
    let mut half = TcpStream::connect(&server.addr).await.expect("connect");
    half.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    half.shutdown().await.expect("half-close");
    let answer = read_to_close(&mut half, Duration::from_secs(10))
        .await
        .expect("answer");
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "half-closed client answered: {answer:?}"
    );

    // The server still serves normally.
    let c = reqwest::Client::new();
    let r = c.get(url(&server, "/health")).send().await.expect("health");
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_client_ip_are_limited() {
    let server = serve_with(&["--max-connections-per-ip", "3"]);
    // Three connections, each served once and kept open: they hold the three places.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut t = TcpStream::connect(&server.addr).await.expect("connect");
        t.write_all(HEALTH_KEEP_ALIVE.as_bytes())
            .await
            .expect("write");
        assert!(read_response(&mut t).await.starts_with("HTTP/1.1 200"));
        held.push(t);
    }
    let mut fourth = TcpStream::connect(&server.addr).await.expect("connect");
    let _ = fourth.write_all(HEALTH_KEEP_ALIVE.as_bytes()).await;
    let answer = read_to_close(&mut fourth, Duration::from_secs(10))
        .await
        .expect("the fourth connection is closed");
    assert!(answer.is_empty(), "closed unanswered: {answer}");

    // One place given back: a new connection is served (once the server has seen the close).
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut t = TcpStream::connect(&server.addr).await.expect("connect");
        let _ = t
            .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await;
        let a = read_to_close(&mut t, Duration::from_secs(10))
            .await
            .unwrap_or_default();
        if a.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "the freed place is never reused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = reqwest::Client::new();
    // reqwest would need a fourth place: free them all first.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        if let Ok(r) = m.get(url(&server, "/metrics")).send().await
            && let Ok(t) = r.text().await
        {
            break t;
        }
        assert!(Instant::now() < deadline, "metrics never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        text.contains("moe_http_connections_refused_total{reason=\"per_ip_limit\"}"),
        "the refusal is counted"
    );
}
