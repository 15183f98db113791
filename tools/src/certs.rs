//! `microcosm certs`: the cluster CA and node certificates.

use std::path::Path;

use anyhow::Context;
use microcosm_transport::tls::{self, Role, init_cluster_certs};

/// Creates the CA and one certificate per role in `dir`.
pub fn init(dir: &Path, cluster_name: &str, sans: &[String]) -> anyhow::Result<()> {
    init_cluster_certs(dir, cluster_name, sans)
        .with_context(|| format!("cannot create certificates in {}", dir.display()))?;
    println!(
        "created cluster CA {}",
        dir.join(tls::files::CA_CERT).display()
    );
    for role in Role::ALL {
        println!(
            "created {role} certificate {} (key {})",
            tls::cert_path(dir, role).display(),
            tls::key_path(dir, role).display()
        );
    }
    println!(
        "created the CA's private key {}: whoever holds it can issue certificates of any \
         role. Beyond a local cluster, keep it off the nodes, and give each node only {} and \
         its own role's certificate and key.",
        dir.join(tls::files::CA_KEY).display(),
        tls::files::CA_CERT
    );
    Ok(())
}
