//! The keys and certificates of one test API server, made fresh for each:
//! a CA, a serving certificate for 127.0.0.1 signed by it, and the key pair
//! that signs and verifies service-account tokens.

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

pub(crate) struct Pki {
    pub ca_cert_pem: String,
    pub ca_cert_der: Vec<u8>,
    pub serving_cert_pem: String,
    pub serving_key_pem: String,
    /// PKCS#8, for --service-account-signing-key-file.
    pub service_account_key_pem: String,
    /// SubjectPublicKeyInfo, for --service-account-key-file.
    pub service_account_public_pem: String,
}

/// Names the serving certificate answers to: loopback, and the names pods
/// would use for the API server.
const SERVING_NAMES: [&str; 6] = [
    "127.0.0.1",
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
];

pub(crate) fn generate() -> Result<Pki> {
    // ECDSA P-256 throughout: quick to generate, accepted by kube-apiserver
    // for serving and for service-account tokens (ES256).
    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "liveclone kubetest CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .context("self-signing the CA")?;
    let issuer = Issuer::new(ca_params, ca_key);

    let serving_key = KeyPair::generate().context("generating the serving key")?;
    let names: Vec<String> = SERVING_NAMES.iter().map(|name| name.to_string()).collect();
    let mut serving_params = CertificateParams::new(names).context("serving parameters")?;
    serving_params
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    serving_params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    serving_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_cert = serving_params
        .signed_by(&serving_key, &issuer)
        .context("signing the serving certificate")?;

    let service_account_key = KeyPair::generate().context("generating the service-account key")?;

    Ok(Pki {
        ca_cert_pem: ca_cert.pem(),
        ca_cert_der: ca_cert.der().to_vec(),
        serving_cert_pem: serving_cert.pem(),
        serving_key_pem: serving_key.serialize_pem(),
        service_account_key_pem: service_account_key.serialize_pem(),
        service_account_public_pem: service_account_key.public_key_pem(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_pem_of_each_kind() {
        let pki = generate().expect("generate");
        assert!(pki.ca_cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(pki
            .serving_cert_pem
            .starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(pki
            .serving_key_pem
            .starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(pki
            .service_account_key_pem
            .starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(pki
            .service_account_public_pem
            .starts_with("-----BEGIN PUBLIC KEY-----"));
        assert!(!pki.ca_cert_der.is_empty());
    }
}
