//! TLS for every role, on rustls with the `ring` provider: loading PEM files with clear errors,
//! server configurations that follow their files ([`ServerTls`]: a rotated certificate, key or
//! CA is picked up by the next connection, without a restart), the cluster's mutual TLS between
//! routers and expert nodes ([`ClusterTls`]: the client's certificate must chain to the cluster
//! CA and, optionally, name one of an allowed list of SANs), and the gRPC client side (tonic's
//! [`ClientTlsConfig`], read from the files on every connect, so clients rotate too).
//!
//! - [`accept`]: the TLS accept loop in front of a tonic server (handshake timeout, plaintext
//!   clients recognised and logged, failed handshakes never stall the listener).
//!
//! References: <https://docs.rs/rustls/0.23/rustls/server/struct.WebPkiClientVerifier.html>,
//! <https://docs.rs/tonic/0.14/tonic/transport/struct.ClientTlsConfig.html>.

pub mod accept;
mod verify;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

pub use accept::{HANDSHAKE_TIMEOUT, incoming};

/// How often [`ServerTls::watch`] re-reads its files.
pub const RELOAD_PERIOD: Duration = Duration::from_secs(1);

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} file {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} file {path} is not valid PEM: {why}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("{what} file {path} holds no {item}")]
    Empty {
        what: &'static str,
        path: PathBuf,
        item: &'static str,
    },
    #[error("CA file {path}: {why}")]
    Ca { path: PathBuf, why: String },
    #[error("certificate {cert} and key {key} do not form a usable identity: {why}")]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        why: String,
    },
    #[error("{0}")]
    Config(String),
}

/// The process's one crypto provider (ring; aws-lc is never built).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate of the PEM text `pem` (read from `path`, named `what` in errors).
pub fn parse_certs(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_path_buf(),
            item: "certificate",
        });
    }
    Ok(certs)
}

/// The private key of the PEM text `pem` (PKCS#8, PKCS#1 or SEC1).
pub fn parse_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            what: "key",
            path: path.to_path_buf(),
            item: "private key",
        },
        e => TlsError::Pem {
            what: "key",
            path: path.to_path_buf(),
            why: e.to_string(),
        },
    })
}

/// The trust anchors of a CA bundle.
pub fn parse_roots(path: &Path, pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs("CA", path, pem)? {
        roots.add(cert).map_err(|e| TlsError::Ca {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// Builds a server configuration from the current contents of its files.
type Build = dyn Fn(&Files) -> Result<rustls::ServerConfig, TlsError> + Send + Sync;

/// The files a server configuration is built from, and their contents when last built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files {
    pub cert: (PathBuf, Vec<u8>),
    pub key: (PathBuf, Vec<u8>),
    pub ca: Option<(PathBuf, Vec<u8>)>,
}

impl Files {
    fn read(cert: &Path, key: &Path, ca: Option<&Path>) -> Result<Files, TlsError> {
        Ok(Files {
            cert: (cert.to_path_buf(), read("certificate", cert)?),
            key: (key.to_path_buf(), read("key", key)?),
            ca: match ca {
                Some(p) => Some((p.to_path_buf(), read("CA", p)?)),
                None => None,
            },
        })
    }

    /// The certificate chain and key, checked to belong together.
    fn identity(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let certs = parse_certs("certificate", &self.cert.0, &self.cert.1)?;
        let key = parse_key(&self.key.0, &self.key.1)?;
        Ok((certs, key))
    }

    fn identity_error(&self, e: impl std::fmt::Display) -> TlsError {
        TlsError::Identity {
            cert: self.cert.0.clone(),
            key: self.key.0.clone(),
            why: e.to_string(),
        }
    }
}

/// A server's TLS configuration that follows its files: [`ServerTls::current`] is what the next
/// handshake uses; [`ServerTls::watch`] re-reads the files every [`RELOAD_PERIOD`] and swaps in
/// a new configuration when their contents change. Files that turn unreadable or inconsistent
/// (a certificate replaced before its key) keep the last good configuration, with a warning.
pub struct ServerTls {
    role: &'static str,
    paths: (PathBuf, PathBuf, Option<PathBuf>),
    build: Box<Build>,
    state: RwLock<(Files, Arc<rustls::ServerConfig>)>,
    refusals: accept::Refusals,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("role", &self.role)
            .field("cert", &self.paths.0)
            .field("ca", &self.paths.2)
            .finish()
    }
}

impl ServerTls {
    fn new(
        role: &'static str,
        cert: &Path,
        key: &Path,
        ca: Option<&Path>,
        build: Box<Build>,
    ) -> Result<Arc<ServerTls>, TlsError> {
        let files = Files::read(cert, key, ca)?;
        let config = Arc::new(build(&files)?);
        Ok(Arc::new(ServerTls {
            role,
            paths: (
                cert.to_path_buf(),
                key.to_path_buf(),
                ca.map(Path::to_path_buf),
            ),
            build,
            state: RwLock::new((files, config)),
            refusals: accept::Refusals::default(),
        }))
    }

    /// HTTPS for the API: a certificate and key, no client certificates; ALPN h2 and http/1.1.
    pub fn https(cert: &Path, key: &Path) -> Result<Arc<ServerTls>, TlsError> {
        let build = |f: &Files| {
            let (certs, key) = f.identity()?;
            let mut c = rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| TlsError::Config(e.to_string()))?
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .map_err(|e| f.identity_error(e))?;
            c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            Ok(c)
        };
        ServerTls::new("https", cert, key, None, Box::new(build))
    }

    /// Connections [`incoming`] refused, by reason.
    pub fn refusals(&self) -> &accept::Refusals {
        &self.refusals
    }

    /// The configuration the next handshake uses.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        self.state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    /// Re-reads the files; true when a new configuration was installed.
    pub fn reload(&self) -> bool {
        let (cert, key, ca) = (&self.paths.0, &self.paths.1, self.paths.2.as_deref());
        let files = match Files::read(cert, key, ca) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(role = self.role, error = %e, "TLS files unreadable; keeping the last good ones");
                return false;
            }
        };
        if self.state.read().unwrap_or_else(|p| p.into_inner()).0 == files {
            return false;
        }
        match (self.build)(&files) {
            Ok(c) => {
                *self.state.write().unwrap_or_else(|p| p.into_inner()) = (files, Arc::new(c));
                tracing::info!(role = self.role, cert = %cert.display(), "TLS certificate reloaded");
                true
            }
            Err(e) => {
                tracing::warn!(role = self.role, error = %e, "new TLS files refused; keeping the last good ones");
                false
            }
        }
    }

    /// Re-reads the files every [`RELOAD_PERIOD`] on the current tokio runtime, for as long as
    /// the configuration is in use.
    pub fn watch(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(tls) = weak.upgrade() else { return };
                // Reading and parsing a few KB is quick, but it is file I/O: off the workers.
                let _ = tokio::task::spawn_blocking(move || tls.reload()).await;
            }
        });
    }
}

/// The cluster's mutual TLS (gRPC between routers and expert nodes): every role has a
/// certificate and key issued by the cluster CA and trusts only that CA. A node accepts a client
/// only if its certificate chains to the CA and, when `allowed_sans` is not empty, is valid for
/// one of those names (DNS names or IP addresses). A router verifies a node's certificate
/// against the host of the address it dials (the address in the placement).
#[derive(Debug, Clone)]
pub struct ClusterTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub allowed_sans: Vec<String>,
}

impl ClusterTls {
    /// From the optional flags: all three files, or none (plaintext); anything else is an error.
    pub fn from_flags(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
        allowed_sans: &[String],
    ) -> Result<Option<ClusterTls>, TlsError> {
        match (ca, cert, key) {
            (None, None, None) if allowed_sans.is_empty() => Ok(None),
            (Some(ca), Some(cert), Some(key)) => {
                let tls = ClusterTls {
                    ca: ca.to_path_buf(),
                    cert: cert.to_path_buf(),
                    key: key.to_path_buf(),
                    allowed_sans: allowed_sans.to_vec(),
                };
                // Fail at start-up, not at the first connection.
                tls.server()?;
                tls.client()?;
                Ok(Some(tls))
            }
            _ => Err(TlsError::Config(
                "cluster TLS needs all of --cluster-tls-ca, --cluster-tls-cert and --cluster-tls-key (an allowed-SAN list needs them too)".into(),
            )),
        }
    }

    /// The server side (an expert node): client certificates required.
    pub fn server(&self) -> Result<Arc<ServerTls>, TlsError> {
        let sans = self.allowed_sans.clone();
        let build = move |f: &Files| {
            let (ca_path, ca_pem) =
                f.ca.as_ref()
                    .ok_or_else(|| TlsError::Config("mutual TLS needs a CA".into()))?;
            let roots = Arc::new(parse_roots(ca_path, ca_pem)?);
            let verifier = verify::ClusterClientVerifier::build(roots, &sans)?;
            let (certs, key) = f.identity()?;
            let mut c = rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| TlsError::Config(e.to_string()))?
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs, key)
                .map_err(|e| f.identity_error(e))?;
            c.alpn_protocols = vec![b"h2".to_vec()];
            Ok(c)
        };
        ServerTls::new(
            "cluster",
            &self.cert,
            &self.key,
            Some(&self.ca),
            Box::new(build),
        )
    }

    /// The client side (a router dialling nodes), from the files as they are now: called on
    /// every connect, so a rotated client certificate is used by the next connection.
    pub fn client(&self) -> Result<ClientTlsConfig, TlsError> {
        let files = Files::read(&self.cert, &self.key, Some(&self.ca))?;
        let (ca_path, ca_pem) = files
            .ca
            .as_ref()
            .ok_or_else(|| TlsError::Config("no CA".into()))?;
        parse_roots(ca_path, ca_pem)?;
        let (certs, key) = files.identity()?;
        rustls::sign::CertifiedKey::from_der(certs, key, &provider())
            .map_err(|e| files.identity_error(e))?;
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca_pem))
            .identity(Identity::from_pem(&files.cert.1, &files.key.1))
            .timeout(HANDSHAKE_TIMEOUT))
    }
}

#[cfg(test)]
mod tests;
