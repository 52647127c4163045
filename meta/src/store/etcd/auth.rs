//! How a process authenticates to etcd: TLS (a CA bundle to verify the members, and optionally
//! a client certificate for etcd's `--client-cert-auth`) and etcd's own users (username and
//! password, exchanged by etcd-client for a token it renews). Files are read and checked once,
//! at start-up, through [`crate::tls`], so a wrong path or a bad PEM stops the process with the
//! file named; the password is never printed (`Debug` redacts it).
//!
//! Reference: <https://etcd.io/docs/v3.4/op-guide/security/>, <https://etcd.io/docs/v3.4/op-guide/authentication/>.

use std::path::Path;

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

use crate::tls::{TlsError, parse_certs, parse_key, parse_roots};

/// etcd credentials, loaded.
#[derive(Clone, Default)]
pub struct EtcdAuth {
    /// CA bundle (PEM) that verifies the members' certificates.
    ca: Option<Vec<u8>>,
    /// Client certificate and key (PEM).
    identity: Option<(Vec<u8>, Vec<u8>)>,
    user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdAuth")
            .field("ca", &self.ca.is_some())
            .field("client_cert", &self.identity.is_some())
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish()
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

impl EtcdAuth {
    /// From the flags: a CA (needed for `https://` endpoints with a private CA), a client
    /// certificate and key (both or neither), a user and its password (both or neither).
    pub fn load(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
        user: Option<(String, String)>,
    ) -> Result<EtcdAuth, TlsError> {
        let ca = match ca {
            Some(p) => {
                let pem = read("etcd CA", p)?;
                parse_roots(p, &pem)?;
                Some(pem)
            }
            None => None,
        };
        let identity = match (cert, key) {
            (Some(c), Some(k)) => {
                let (cp, kp) = (read("etcd certificate", c)?, read("etcd key", k)?);
                let certs = parse_certs("etcd certificate", c, &cp)?;
                let der = parse_key(k, &kp)?;
                rustls::sign::CertifiedKey::from_der(certs, der, &crate::tls::provider()).map_err(
                    |e| TlsError::Identity {
                        cert: c.to_path_buf(),
                        key: k.to_path_buf(),
                        why: e.to_string(),
                    },
                )?;
                Some((cp, kp))
            }
            (None, None) => None,
            _ => {
                return Err(TlsError::Config(
                    "an etcd client certificate needs both --etcd-cert and --etcd-key".into(),
                ));
            }
        };
        if let Some((u, p)) = &user
            && (u.is_empty() || p.is_empty())
        {
            return Err(TlsError::Config(
                "an etcd user needs a non-empty name and password".into(),
            ));
        }
        Ok(EtcdAuth { ca, identity, user })
    }

    /// Whether TLS is configured (endpoints should be `https://`).
    pub fn uses_tls(&self) -> bool {
        self.ca.is_some() || self.identity.is_some()
    }

    /// `opts` with these credentials.
    pub fn apply(&self, mut opts: ConnectOptions) -> ConnectOptions {
        if self.uses_tls() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.ca {
                tls = tls.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some((c, k)) = &self.identity {
                tls = tls.identity(Identity::from_pem(c, k));
            }
            opts = opts.with_tls(tls);
        }
        if let Some((u, p)) = &self.user {
            opts = opts.with_user(u.clone(), p.clone());
        }
        opts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_that_cannot_work_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().expect("dir");
        let missing = dir.path().join("etcd-ca.pem");
        let e = EtcdAuth::load(Some(&missing), None, None, None).expect_err("missing CA");
        assert!(
            e.to_string().contains("etcd CA file") && e.to_string().contains("etcd-ca.pem"),
            "{e}"
        );

        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "no PEM here\n").expect("write");
        let e = EtcdAuth::load(Some(&junk), None, None, None).expect_err("no certificate");
        assert!(e.to_string().contains("holds no certificate"), "{e}");

        let e = EtcdAuth::load(None, Some(&junk), None, None).expect_err("a cert without a key");
        assert!(e.to_string().contains("--etcd-key"), "{e}");

        let e = EtcdAuth::load(None, None, None, Some(("root".into(), String::new())))
            .expect_err("an empty password");
        assert!(e.to_string().contains("password"), "{e}");

        let ok = EtcdAuth::load(None, None, None, Some(("moe".into(), "s3cret".into())))
            .expect("a user alone is fine");
        assert!(!ok.uses_tls());
        assert!(
            !format!("{ok:?}").contains("s3cret"),
            "Debug never shows the password"
        );
    }
}
