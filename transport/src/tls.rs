//! Cluster certificates and mutual-TLS configuration.
//!
//! A cluster CA signs one certificate per role (master, executor, client). Each certificate
//! names its role twice: in a URI SAN `microcosm://role/<role>` (read back after the handshake
//! to authorize calls) and in a DNS SAN `<role>.microcosm` (so a dialer can pin the role of the
//! server it expects). Every connection presents a certificate and verifies the peer's against
//! the cluster CA; a peer without one is refused at the handshake.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::error::TlsError;

/// ALPN protocol id spoken by every microcosm endpoint.
pub const ALPN: &[u8] = b"microcosm/1";

/// The role a certificate grants its holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A master: member of the Raft group, schedules jobs.
    Master,
    /// An executor: runs tasks, serves data streams to peer executors.
    Executor,
    /// A client: submits and inspects jobs (the CLI).
    Client,
}

impl Role {
    /// Every role, in a fixed order.
    pub const ALL: [Role; 3] = [Role::Master, Role::Executor, Role::Client];

    /// The lowercase name used in certificates and file names.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Master => "master",
            Role::Executor => "executor",
            Role::Client => "client",
        }
    }

    /// The DNS name a certificate of this role carries, used as the TLS server name.
    pub fn server_name(self) -> &'static str {
        match self {
            Role::Master => "master.microcosm",
            Role::Executor => "executor.microcosm",
            Role::Client => "client.microcosm",
        }
    }

    fn uri(self) -> String {
        format!("microcosm://role/{}", self.as_str())
    }

    fn from_uri(uri: &str) -> Option<Role> {
        let name = uri.strip_prefix("microcosm://role/")?;
        Role::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| TlsError::UnknownRole(s.to_string()))
    }
}

/// File names inside a certificate directory.
pub mod files {
    /// The cluster CA certificate (PEM).
    pub const CA_CERT: &str = "ca.pem";
    /// The cluster CA private key (PEM, PKCS#8). Keep it away from nodes in production.
    pub const CA_KEY: &str = "ca.key";
}

/// Path of the certificate of `role` inside `dir`.
pub fn cert_path(dir: &Path, role: Role) -> PathBuf {
    dir.join(format!("{}.pem", role.as_str()))
}

/// Path of the private key of `role` inside `dir`.
pub fn key_path(dir: &Path, role: Role) -> PathBuf {
    dir.join(format!("{}.key", role.as_str()))
}

/// Validity of generated certificates.
const VALIDITY: Duration = Duration::from_secs(3650 * 24 * 3600);

fn validity(params: &mut CertificateParams) {
    let now = std::time::SystemTime::now();
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + VALIDITY).into();
}

/// A freshly generated cluster CA that can sign node certificates.
pub struct ClusterCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl ClusterCa {
    /// Generates a new CA (ECDSA P-256) named after `cluster_name`.
    pub fn generate(cluster_name: &str) -> Result<Self, TlsError> {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("microcosm cluster CA {cluster_name}"),
        );
        params.distinguished_name = dn;
        validity(&mut params);
        let key = KeyPair::generate().map_err(TlsError::Generate)?;
        let issuer = CertifiedIssuer::self_signed(params, key).map_err(TlsError::Generate)?;
        Ok(Self { issuer })
    }

    /// Writes the CA certificate and key into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), TlsError> {
        write_file(
            &dir.join(files::CA_CERT),
            self.issuer.pem().as_bytes(),
            false,
        )?;
        write_file(
            &dir.join(files::CA_KEY),
            self.issuer.key().serialize_pem().as_bytes(),
            true,
        )
    }

    /// Issues a certificate for `role`, valid for the given extra IP addresses and DNS names
    /// (loopback and `localhost` are always included), and returns it with its key.
    pub fn issue(&self, role: Role, extra_sans: &[String]) -> Result<NodeCert, TlsError> {
        let mut names = vec![
            role.server_name().to_string(),
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ];
        names.extend(extra_sans.iter().cloned());
        let mut params = CertificateParams::new(names).map_err(TlsError::Generate)?;
        let uri = role.uri().try_into().map_err(TlsError::Generate)?;
        params.subject_alt_names.push(SanType::URI(uri));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("microcosm {}", role.as_str()));
        params.distinguished_name = dn;
        validity(&mut params);
        let key = KeyPair::generate().map_err(TlsError::Generate)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(TlsError::Generate)?;
        Ok(NodeCert {
            role,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// The CA certificate in PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }
}

/// A node certificate and its private key, in PEM.
pub struct NodeCert {
    /// The role the certificate grants.
    pub role: Role,
    /// Certificate (PEM).
    pub cert_pem: String,
    /// Private key (PEM, PKCS#8).
    pub key_pem: String,
}

impl NodeCert {
    /// Writes `<role>.pem` and `<role>.key` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), TlsError> {
        write_file(&cert_path(dir, self.role), self.cert_pem.as_bytes(), false)?;
        write_file(&key_path(dir, self.role), self.key_pem.as_bytes(), true)
    }
}

/// Creates a new cluster CA and one certificate per role in `dir` (created if missing).
///
/// Refuses to overwrite an existing CA: a new CA would lock every running node out.
pub fn init_cluster_certs(
    dir: &Path,
    cluster_name: &str,
    extra_sans: &[String],
) -> Result<(), TlsError> {
    fs::create_dir_all(dir).map_err(|e| TlsError::Io(dir.to_path_buf(), e))?;
    if dir.join(files::CA_CERT).exists() {
        return Err(TlsError::AlreadyInitialized(dir.to_path_buf()));
    }
    let ca = ClusterCa::generate(cluster_name)?;
    // Everything is issued before anything is written: a bad SAN leaves no half-made
    // directory that a corrected second run would find "already initialized".
    let issued = Role::ALL
        .into_iter()
        .map(|role| ca.issue(role, extra_sans))
        .collect::<Result<Vec<_>, _>>()?;
    ca.write(dir)?;
    for cert in issued {
        cert.write(dir)?;
    }
    Ok(())
}

/// What a node needs for mutual TLS: the cluster CA, its own certificate chain and key.
#[derive(Clone)]
pub struct Identity {
    role: Role,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Identity")
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads the CA and the certificate of `role` from a directory made by
    /// [`init_cluster_certs`].
    pub fn load(dir: &Path, role: Role) -> Result<Self, TlsError> {
        let ca = read_file(&dir.join(files::CA_CERT))?;
        let cert = read_file(&cert_path(dir, role))?;
        let key = read_file(&key_path(dir, role))?;
        Self::from_pem(role, &ca, &cert, &key)
    }

    /// Builds an identity from PEM bytes.
    pub fn from_pem(
        role: Role,
        ca_pem: &[u8],
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for der in CertificateDer::pem_slice_iter(ca_pem) {
            let der = der.map_err(|e| TlsError::BadPem("ca".into(), e.to_string()))?;
            roots
                .add(der)
                .map_err(|e| TlsError::BadPem("ca".into(), e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(TlsError::BadPem("ca".into(), "no certificate found".into()));
        }
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::BadPem(role.as_str().into(), e.to_string()))?;
        let leaf = chain
            .first()
            .ok_or_else(|| TlsError::BadPem(role.as_str().into(), "no certificate found".into()))?;
        let found = role_of_cert(leaf)?;
        if found != role {
            return Err(TlsError::RoleMismatch {
                expected: role,
                found,
            });
        }
        let key = PrivatePkcs8KeyDer::from_pem_slice(key_pem).map_err(|e| {
            TlsError::BadPem(format!("{} key", role.as_str()).into(), e.to_string())
        })?;
        Ok(Self {
            role,
            roots: Arc::new(roots),
            chain,
            key: Arc::new(PrivateKeyDer::Pkcs8(key)),
        })
    }

    /// The role this identity's certificate grants.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The key an endpoint bound at `addr` signs its stateless resets with: derived from
    /// this identity's private key and the address, so a node that restarts at the same
    /// address with the same key answers a stale connection's packets with a reset its peer
    /// accepts. The peer then drops the connection at once, instead of sending into it until
    /// its idle timeout while the restarted node discards every packet. (A random key per
    /// start, quinn's default, gives resets that no peer of the old process can verify.)
    pub(crate) fn reset_key(&self, addr: SocketAddr) -> ring::hmac::Key {
        let derived = self.derive(&format!("microcosm stateless reset key for {addr}"));
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref())
    }

    /// The key an endpoint bound at `addr` signs the connection ids it hands out with, derived
    /// like [`Identity::reset_key`]. A restarted node must recognise its predecessor's ids as
    /// its own: an endpoint sends a stateless reset only for a packet whose id it could have
    /// issued, and drops any other unknown one in silence (with quinn's default, a random key
    /// per start, it drops them all).
    pub(crate) fn cid_key(&self, addr: SocketAddr) -> u64 {
        let derived = self.derive(&format!("microcosm connection id key for {addr}"));
        let mut key = [0u8; 8];
        key.copy_from_slice(&derived.as_ref()[..8]);
        u64::from_le_bytes(key)
    }

    /// HMAC-SHA256 of `label` under this identity's private key.
    fn derive(&self, label: &str) -> ring::hmac::Tag {
        let secret = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.key.secret_der());
        ring::hmac::sign(&secret, label.as_bytes())
    }

    pub(crate) fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider.clone())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        cfg.max_early_data_size = 0;
        Ok(cfg)
    }

    pub(crate) fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        cfg.enable_early_data = false;
        Ok(cfg)
    }
}

/// Reads the role a (chain-validated) certificate names in its URI SAN.
pub fn role_of_cert(cert: &CertificateDer<'_>) -> Result<Role, TlsError> {
    let parsed =
        webpki::EndEntityCert::try_from(cert).map_err(|e| TlsError::BadCert(e.to_string()))?;
    let mut roles = parsed.valid_uri_names().filter_map(Role::from_uri);
    match (roles.next(), roles.next()) {
        (Some(role), None) => Ok(role),
        (None, _) => Err(TlsError::BadCert(
            "certificate names no microcosm role".into(),
        )),
        (Some(_), Some(_)) => Err(TlsError::BadCert("certificate names several roles".into())),
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|e| TlsError::Io(path.to_path_buf(), e))
}

fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), TlsError> {
    use std::io::Write;
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    let _ = secret;
    let mut f = opts
        .open(path)
        .map_err(|e| TlsError::Io(path.to_path_buf(), e))?;
    f.write_all(bytes)
        .map_err(|e| TlsError::Io(path.to_path_buf(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SAN that cannot be issued leaves nothing behind: the corrected run succeeds.
    #[test]
    fn a_bad_san_leaves_no_half_made_directory() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        let bad = ["n\u{f6}de.example".to_string()];
        assert!(init_cluster_certs(&certs, "t", &bad).is_err());
        assert!(!certs.join(files::CA_CERT).exists());
        init_cluster_certs(&certs, "t", &[]).expect("a corrected second run succeeds");
    }

    #[test]
    fn issued_certificates_carry_their_role() {
        let ca = ClusterCa::generate("t").unwrap();
        for role in Role::ALL {
            let cert = ca.issue(role, &[]).unwrap();
            let id = Identity::from_pem(
                role,
                ca.cert_pem().as_bytes(),
                cert.cert_pem.as_bytes(),
                cert.key_pem.as_bytes(),
            )
            .unwrap();
            assert_eq!(id.role(), role);
        }
    }

    #[test]
    fn loading_a_certificate_as_the_wrong_role_fails() {
        let ca = ClusterCa::generate("t").unwrap();
        let cert = ca.issue(Role::Client, &[]).unwrap();
        let err = Identity::from_pem(
            Role::Master,
            ca.cert_pem().as_bytes(),
            cert.cert_pem.as_bytes(),
            cert.key_pem.as_bytes(),
        )
        .unwrap_err();
        assert!(matches!(
            err,
            TlsError::RoleMismatch {
                expected: Role::Master,
                found: Role::Client
            }
        ));
    }

    #[test]
    fn init_writes_all_files_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        init_cluster_certs(dir.path(), "t", &[]).unwrap();
        for role in Role::ALL {
            Identity::load(dir.path(), role).unwrap();
        }
        let again = init_cluster_certs(dir.path(), "t", &[]).unwrap_err();
        assert!(matches!(again, TlsError::AlreadyInitialized(_)));
    }
}
