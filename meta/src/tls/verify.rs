//! The client-certificate check of an expert node: webpki's chain verification against the
//! cluster CA ([`WebPkiClientVerifier`]), then, when an allowed-SAN list is configured, the
//! certificate must be valid for one of its names (DNS name or IP address), so a certificate the
//! CA issued for some other purpose is still refused.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, Error, RootCertStore, SignatureScheme};

use super::{TlsError, provider};

#[derive(Debug)]
pub struct ClusterClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<ServerName<'static>>,
}

impl ClusterClientVerifier {
    /// The verifier for `roots`, with the SAN check when `allowed_sans` is not empty.
    pub fn build(
        roots: Arc<RootCertStore>,
        allowed_sans: &[String],
    ) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
        let inner = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
        if allowed_sans.is_empty() {
            return Ok(inner);
        }
        let allowed = allowed_sans
            .iter()
            .map(|s| {
                ServerName::try_from(s.clone())
                    .map_err(|e| TlsError::Config(format!("allowed SAN `{s}`: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(ClusterClientVerifier { inner, allowed }))
    }
}

impl ClientCertVerifier for ClusterClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| Error::General(format!("client certificate: {e}")))?;
        if self
            .allowed
            .iter()
            .any(|name| cert.verify_is_valid_for_subject_name(name).is_ok())
        {
            Ok(verified)
        } else {
            Err(Error::General(
                "client certificate names none of the allowed SANs".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
