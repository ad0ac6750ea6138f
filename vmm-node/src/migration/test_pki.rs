//! A throwaway certificate authority for tests and benchmarks (rcgen): a CA and node
//! certificates with IP SANs and both `serverAuth` and `clientAuth` usages, as the cluster
//! PKI issues them. PEM in, PEM out, so it does not depend on the crate it tests
//! (integration tests include this file with `#[path]`).
#![allow(dead_code)]

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A CA that signs node certificates.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A node's certificate (leaf, PEM and DER) and private key (PEM).
#[derive(Debug, Clone)]
pub struct NodeCert {
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    pub key_pem: String,
}

impl TestCa {
    /// A fresh CA named `name`.
    pub fn new(name: &str) -> TestCa {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        TestCa {
            issuer: CertifiedIssuer::self_signed(p, key).expect("CA certificate"),
        }
    }

    pub fn ca_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A node certificate for `name` valid for the IP addresses `ips`.
    pub fn node(&self, name: &str, ips: &[IpAddr]) -> NodeCert {
        let sans: Vec<String> = ips.iter().map(|ip| ip.to_string()).collect();
        let mut p = CertificateParams::new(sans).expect("node params");
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("node key");
        let cert = p.signed_by(&key, &self.issuer).expect("node certificate");
        NodeCert {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key_pem: key.serialize_pem(),
        }
    }
}
