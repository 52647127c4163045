//! Loading errors name the file and what is wrong; the SAN allow-list and reloading work over a
//! real handshake (in memory). Certificates are generated here with rcgen.

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::ServerName;

use super::*;

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, name.to_string());
        let issuer =
            CertifiedIssuer::self_signed(p, KeyPair::generate().expect("key")).expect("ca");
        Ca { issuer }
    }

    /// (certificate PEM, key PEM) for `sans`.
    fn leaf(&self, sans: &[&str]) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let cert = CertificateParams::new(sans)
            .expect("params")
            .signed_by(&key, &self.issuer)
            .expect("signed");
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

#[test]
fn a_missing_file_names_the_file() {
    let dir = tempfile::tempdir().expect("dir");
    let missing = dir.path().join("nope.pem");
    let e = ServerTls::https(&missing, &missing).expect_err("refused");
    let text = e.to_string();
    assert!(matches!(e, TlsError::Read { .. }), "{e:?}");
    assert!(
        text.contains("certificate file") && text.contains("nope.pem"),
        "{text}"
    );
}

#[test]
fn bad_pem_and_empty_files_are_told_apart() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = Ca::new("ca");
    let (cert, key) = ca.leaf(&["localhost"]);
    let key_path = write(dir.path(), "key.pem", &key);
    let broken = write(
        dir.path(),
        "broken.pem",
        "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n",
    );
    let e = ServerTls::https(&broken, &key_path).expect_err("refused");
    assert!(matches!(e, TlsError::Pem { .. }), "{e:?}");
    assert!(e.to_string().contains("broken.pem"), "{e}");

    let text = write(dir.path(), "text.pem", "hello\n");
    let e = ServerTls::https(&text, &key_path).expect_err("refused");
    assert!(e.to_string().contains("holds no certificate"), "{e}");

    let cert_path = write(dir.path(), "cert.pem", &cert);
    let e = ServerTls::https(&cert_path, &cert_path).expect_err("a certificate is no key");
    assert!(e.to_string().contains("holds no private key"), "{e}");
}

#[test]
fn a_key_of_another_certificate_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = Ca::new("ca");
    let (cert, _) = ca.leaf(&["localhost"]);
    let (_, other_key) = ca.leaf(&["localhost"]);
    let c = write(dir.path(), "cert.pem", &cert);
    let k = write(dir.path(), "key.pem", &other_key);
    let e = ServerTls::https(&c, &k).expect_err("refused");
    assert!(matches!(e, TlsError::Identity { .. }), "{e:?}");
    let cluster = ClusterTls {
        ca: write(dir.path(), "ca.pem", &ca.issuer.pem()),
        cert: c,
        key: k,
        allowed_sans: vec![],
    };
    assert!(matches!(cluster.client(), Err(TlsError::Identity { .. })));
}

#[test]
fn cluster_tls_is_all_three_files_or_none() {
    assert!(
        ClusterTls::from_flags(None, None, None, &[])
            .expect("ok")
            .is_none()
    );
    let p = Path::new("/x");
    let e = ClusterTls::from_flags(Some(p), None, Some(p), &[]).expect_err("partial");
    assert!(e.to_string().contains("--cluster-tls-cert"), "{e}");
    let e = ClusterTls::from_flags(None, None, None, &["a".into()]).expect_err("SANs alone");
    assert!(matches!(e, TlsError::Config(_)), "{e:?}");
}

/// A handshake in memory: the client presents `client` and trusts `ca_pem`; the result is the
/// server's verdict and the server certificate the client saw.
async fn handshake(
    server: Arc<rustls::ServerConfig>,
    ca_pem: &str,
    client: Option<(&str, &str)>,
) -> Result<Vec<u8>, String> {
    let roots = parse_roots(Path::new("ca"), ca_pem.as_bytes()).expect("roots");
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                parse_certs("c", Path::new("c"), cert.as_bytes()).expect("certs"),
                parse_key(Path::new("k"), key.as_bytes()).expect("key"),
            )
            .expect("client auth"),
        None => builder.with_no_client_auth(),
    };
    let (a, b) = tokio::io::duplex(64 << 10);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("localhost").expect("name");
    let srv = tokio::spawn(async move {
        tokio_rustls::TlsAcceptor::from(server)
            .accept(b)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    let cli = connector.connect(name, a).await;
    let verdict = srv.await.expect("server task");
    verdict?;
    let cli = cli.map_err(|e| e.to_string())?;
    let seen = cli.get_ref().1.peer_certificates().expect("server certs")[0].to_vec();
    Ok(seen)
}

fn cluster(dir: &Path, ca: &Ca, leaf: &(String, String), sans: &[&str]) -> ClusterTls {
    ClusterTls {
        ca: write(dir, "ca.pem", &ca.issuer.pem()),
        cert: write(dir, "node.pem", &leaf.0),
        key: write(dir, "node.key", &leaf.1),
        allowed_sans: sans.iter().map(|s| s.to_string()).collect(),
    }
}

#[tokio::test]
async fn nodes_accept_only_cluster_clients_with_an_allowed_san() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = Ca::new("cluster");
    let other = Ca::new("other");
    let node = ca.leaf(&["localhost"]);
    let router = ca.leaf(&["router.moe"]);
    let stranger = other.leaf(&["router.moe"]);
    let ca_pem = ca.issuer.pem();

    let open = cluster(dir.path(), &ca, &node, &[])
        .server()
        .expect("server")
        .current();
    handshake(open.clone(), &ca_pem, Some((&router.0, &router.1)))
        .await
        .expect("a cluster client is accepted");
    let e = handshake(open.clone(), &ca_pem, None)
        .await
        .expect_err("no client certificate");
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    let e = handshake(open, &ca_pem, Some((&stranger.0, &stranger.1)))
        .await
        .expect_err("another CA");
    assert!(
        e.contains("UnknownIssuer") || e.to_lowercase().contains("issuer"),
        "{e}"
    );

    let strict = cluster(dir.path(), &ca, &node, &["router.moe"])
        .server()
        .expect("server")
        .current();
    handshake(strict, &ca_pem, Some((&router.0, &router.1)))
        .await
        .expect("an allowed SAN is accepted");
    let picky = cluster(dir.path(), &ca, &node, &["coordinator.moe"])
        .server()
        .expect("server")
        .current();
    let e = handshake(picky, &ca_pem, Some((&router.0, &router.1)))
        .await
        .expect_err("a SAN not on the list");
    assert!(e.contains("allowed SANs"), "{e}");
}

#[tokio::test]
async fn a_replaced_certificate_is_served_to_the_next_connection() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = Ca::new("ca");
    let (a, b) = (ca.leaf(&["localhost"]), ca.leaf(&["localhost"]));
    let (c, k) = (
        write(dir.path(), "c.pem", &a.0),
        write(dir.path(), "k.pem", &a.1),
    );
    let tls = ServerTls::https(&c, &k).expect("https");
    let der = |pem: &str| parse_certs("c", &c, pem.as_bytes()).expect("der")[0].to_vec();
    let ca_pem = ca.issuer.pem();
    assert_eq!(
        handshake(tls.current(), &ca_pem, None).await.expect("ok"),
        der(&a.0)
    );
    assert!(!tls.reload(), "unchanged files change nothing");

    // The certificate first, its key later: the half-replaced pair is refused and A stays.
    write(dir.path(), "c.pem", &b.0);
    assert!(!tls.reload());
    assert_eq!(
        handshake(tls.current(), &ca_pem, None).await.expect("ok"),
        der(&a.0)
    );
    write(dir.path(), "k.pem", &b.1);
    assert!(tls.reload());
    assert_eq!(
        handshake(tls.current(), &ca_pem, None).await.expect("ok"),
        der(&b.0)
    );

    std::fs::remove_file(&c).expect("rm");
    assert!(
        !tls.reload(),
        "a vanished file keeps the last good configuration"
    );
    assert_eq!(
        handshake(tls.current(), &ca_pem, None).await.expect("ok"),
        der(&b.0)
    );
}
