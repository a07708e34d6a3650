//! Development certificates: a cluster CA and node certificates signed by it (rcgen).
//!
//! Every node (engine or edge) gets one certificate with EKU serverAuth and clientAuth, so the same
//! files serve when it accepts connections and when it opens them. Files in a directory:
//!
//! | file | what |
//! | --- | --- |
//! | `ca.pem` | the cluster CA certificate (give it to every node) |
//! | `ca.key` | the CA private key (keep it where certificates are made, nowhere else) |
//! | `NAME.pem` | node `NAME`'s certificate |
//! | `NAME.key` | node `NAME`'s private key |
//!
//! Keys are written with mode 0600. Nothing is overwritten unless asked.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

/// Common name of the CA that [`write_ca`] makes.
pub const DEFAULT_CA_NAME: &str = "Meridian cluster CA";

/// How long a dev CA is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a node certificate is valid.
pub const NODE_VALIDITY: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// Certificates start this long in the past, so that clocks a little behind still accept them.
const BACKDATE: Duration = Duration::from_secs(3600);

/// Why certificates could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused (bad SAN, key problem).
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A target file exists and overwriting was not asked for.
    #[error("{0} exists; refusing to overwrite it (pass overwrite/--force to replace it)")]
    Exists(PathBuf),
    /// An input is not acceptable.
    #[error("{0}")]
    Invalid(String),
}

/// A CA certificate and its key, both PEM.
#[derive(Debug, Clone)]
pub struct CaPem {
    /// The certificate (`ca.pem`).
    pub cert_pem: String,
    /// The PKCS#8 private key (`ca.key`).
    pub key_pem: String,
}

/// A node certificate and its key, both PEM.
#[derive(Debug, Clone)]
pub struct NodePem {
    /// The node certificate (`NAME.pem`); the chain is just this certificate, the CA is separate.
    pub cert_pem: String,
    /// The PKCS#8 private key (`NAME.key`).
    pub key_pem: String,
}

/// Paths of the CA files in `dir`: (`ca.pem`, `ca.key`).
pub fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.pem"), dir.join("ca.key"))
}

/// Paths of node `name`'s files in `dir`: (`NAME.pem`, `NAME.key`).
pub fn node_paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")))
}

fn now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let now = now();
    params.not_before = epoch + now.saturating_sub(BACKDATE);
    params.not_after = epoch + now + validity;
}

fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, common_name);
    // Only node certificates below it: no intermediate CAs.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params
}

/// Makes a self-signed cluster CA named `common_name` (ECDSA P-256).
pub fn make_ca(common_name: &str) -> Result<CaPem, CertError> {
    if common_name.trim().is_empty() {
        return Err(CertError::Invalid("the CA name is empty".into()));
    }
    let key = KeyPair::generate()?;
    let mut params = ca_params(common_name);
    set_validity(&mut params, CA_VALIDITY);
    let cert = params.self_signed(&key)?;
    Ok(CaPem { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Checks a node name: it names files, so letters, digits, `-`, `_` and `.` only, not starting
/// with `.`, and not `ca`.
pub fn check_node_name(name: &str) -> Result<(), CertError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name != "ca"
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(CertError::Invalid(format!(
            "bad node name {name:?}: use letters, digits, '-', '_' or '.', not starting with '.', not \"ca\""
        )))
    }
}

/// Makes node `name`'s certificate, signed by `ca`, valid for the given DNS names and IP
/// addresses (at least one of them), usable as TLS server and client.
///
/// `ca` must be a CA made by [`make_ca`] (rcgen without its X.509 parser cannot take the issuer
/// name from an arbitrary certificate); the result is checked against `ca.cert_pem`, so a
/// mismatch is an error here rather than a handshake failure later.
pub fn make_node(ca: &CaPem, name: &str, dns: &[String], ips: &[IpAddr]) -> Result<NodePem, CertError> {
    check_node_name(name)?;
    if dns.is_empty() && ips.is_empty() {
        return Err(CertError::Invalid(format!(
            "node {name}: give at least one DNS name or IP address for its certificate"
        )));
    }
    let ca_der = pem_cert_der(&ca.cert_pem)?;
    let ca_name = subject_common_name(&ca_der)
        .ok_or_else(|| CertError::Invalid("the CA certificate has no readable common name".into()))?;
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::new(ca_params(&ca_name), ca_key);

    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names = Vec::new();
    for d in dns {
        let san = d.clone().try_into().map_err(|_| CertError::Invalid(format!("bad DNS name {d:?}")))?;
        params.subject_alt_names.push(SanType::DnsName(san));
    }
    for ip in ips {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, NODE_VALIDITY);

    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    verify_node(&ca_der, cert.der(), dns, ips)?;
    Ok(NodePem { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Checks that `node` chains to `ca` for the first SAN, with rustls' own verifier.
fn verify_node(
    ca: &CertificateDer<'static>,
    node: &CertificateDer<'static>,
    dns: &[String],
    ips: &[IpAddr],
) -> Result<(), CertError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).map_err(|e| CertError::Invalid(format!("CA certificate: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| CertError::Invalid(format!("CA certificate: {e}")))?;
    let server_name = match (dns.first(), ips.first()) {
        (Some(d), _) => {
            ServerName::try_from(d.clone()).map_err(|e| CertError::Invalid(format!("bad DNS name {d:?}: {e}")))?
        }
        (None, Some(ip)) => ServerName::IpAddress((*ip).into()),
        (None, None) => unreachable!("checked by the caller"),
    };
    verifier.verify_server_cert(node, &[], &server_name, &[], UnixTime::now()).map_err(|e| {
        CertError::Invalid(format!(
            "the new node certificate does not verify against the CA ({e}); was the CA made by \
                 `meridian certs ca`?"
        ))
    })?;
    Ok(())
}

fn pem_cert_der(pem: &str) -> Result<CertificateDer<'static>, CertError> {
    let mut reader = pem.as_bytes();
    let first = rustls_pemfile::certs(&mut reader).next();
    match first {
        Some(Ok(der)) => Ok(der),
        Some(Err(e)) => Err(CertError::Invalid(format!("CA certificate PEM: {e}"))),
        None => Err(CertError::Invalid("no certificate in the CA PEM".into())),
    }
}

/// Writes a new CA named [`DEFAULT_CA_NAME`] to `dir/ca.pem` and `dir/ca.key` (creating `dir`).
/// Refuses if either exists, unless `overwrite`. Returns (cert path, key path).
pub fn write_ca(dir: &Path, overwrite: bool) -> Result<(PathBuf, PathBuf), CertError> {
    let (cert_path, key_path) = ca_paths(dir);
    refuse_existing(&[&cert_path, &key_path], overwrite)?;
    let ca = make_ca(DEFAULT_CA_NAME)?;
    create_dir(dir)?;
    write_file(&key_path, ca.key_pem.as_bytes(), 0o600, overwrite)?;
    write_file(&cert_path, ca.cert_pem.as_bytes(), 0o644, overwrite)?;
    Ok((cert_path, key_path))
}

/// Reads the CA from `dir` (`ca.pem`, `ca.key`).
pub fn read_ca(dir: &Path) -> Result<CaPem, CertError> {
    let (cert_path, key_path) = ca_paths(dir);
    let read = |p: &PathBuf| fs::read_to_string(p).map_err(|source| CertError::Io { path: p.clone(), source });
    Ok(CaPem { cert_pem: read(&cert_path)?, key_pem: read(&key_path)? })
}

/// Makes node `name`'s certificate with the CA in `dir` and writes `dir/NAME.pem` and
/// `dir/NAME.key`. Refuses if either exists, unless `overwrite`. Returns (cert path, key path).
pub fn write_node(
    dir: &Path,
    name: &str,
    dns: &[String],
    ips: &[IpAddr],
    overwrite: bool,
) -> Result<(PathBuf, PathBuf), CertError> {
    check_node_name(name)?;
    let (cert_path, key_path) = node_paths(dir, name);
    refuse_existing(&[&cert_path, &key_path], overwrite)?;
    let ca = read_ca(dir)?;
    let node = make_node(&ca, name, dns, ips)?;
    write_file(&key_path, node.key_pem.as_bytes(), 0o600, overwrite)?;
    write_file(&cert_path, node.cert_pem.as_bytes(), 0o644, overwrite)?;
    Ok((cert_path, key_path))
}

fn refuse_existing(paths: &[&PathBuf], overwrite: bool) -> Result<(), CertError> {
    if overwrite {
        return Ok(());
    }
    for p in paths {
        if p.exists() {
            return Err(CertError::Exists((*p).clone()));
        }
    }
    Ok(())
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    fs::create_dir_all(dir).map_err(|source| CertError::Io { path: dir.to_owned(), source })
}

/// Writes `bytes` to `path` with `mode` (Unix). Without `overwrite` the file is created exclusively
/// (a file that appeared since the check is not clobbered). With it, the content goes to a
/// temporary file with the mode already set and is renamed over the old one, so a key is never
/// readable with wider permissions, even briefly.
fn write_file(path: &Path, bytes: &[u8], mode: u32, overwrite: bool) -> Result<(), CertError> {
    let io = |source| CertError::Io { path: path.to_owned(), source };
    let target = if overwrite {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp{}", std::process::id()));
        PathBuf::from(tmp)
    } else {
        path.to_owned()
    };
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    if overwrite {
        let _ = fs::remove_file(&target);
    }
    let mut f = opts.open(&target).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            CertError::Exists(path.to_owned())
        } else {
            io(e)
        }
    })?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(io)?;
    drop(f);
    if overwrite {
        fs::rename(&target, path).map_err(io)?;
    }
    Ok(())
}

// --- A minimal DER reader, enough to find a certificate's subject common name. ---

/// Reads one DER TLV at the start of `input`: (tag, content, rest).
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let mut len = 0usize;
        for &b in &rest[..n] {
            len = (len << 8) | b as usize;
        }
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The subject common name of a DER certificate, if it has one in a string type we read
/// (UTF8String, PrintableString, IA5String). Used to name clients in logs and to rebuild the CA's
/// issuer name.
pub fn subject_common_name(cert_der: &[u8]) -> Option<String> {
    const SEQ: u8 = 0x30;
    const SET: u8 = 0x31;
    const CN_OID: &[u8] = &[0x55, 0x04, 0x03];
    let (tag, cert, _) = der_tlv(cert_der)?;
    if tag != SEQ {
        return None;
    }
    let (tag, tbs, _) = der_tlv(cert)?;
    if tag != SEQ {
        return None;
    }
    let mut rest = tbs;
    let (tag, _, r) = der_tlv(rest)?;
    rest = if tag == 0xa0 { der_tlv(r)?.2 } else { r }; // [0] version, then serial
    let (_, _, r) = der_tlv(rest)?; // signature algorithm
    let (_, _, r) = der_tlv(r)?; // issuer
    let (_, _, r) = der_tlv(r)?; // validity
    let (tag, mut subject, _) = der_tlv(r)?;
    if tag != SEQ {
        return None;
    }
    while !subject.is_empty() {
        let (tag, mut set, r) = der_tlv(subject)?;
        subject = r;
        if tag != SET {
            return None;
        }
        while !set.is_empty() {
            let (_, atv, r) = der_tlv(set)?;
            set = r;
            let (tag, oid, value) = der_tlv(atv)?;
            if tag == 0x06 && oid == CN_OID {
                let (vtag, v, _) = der_tlv(value)?;
                if matches!(vtag, 0x0c | 0x13 | 0x16) {
                    return String::from_utf8(v.to_vec()).ok();
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("meridian-certs-{tag}-{}-{:?}", std::process::id(), now()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn ca_and_node_verify_and_names_read_back() {
        let ca = make_ca("Test CA").unwrap();
        let ca_der = pem_cert_der(&ca.cert_pem).unwrap();
        assert_eq!(subject_common_name(&ca_der).as_deref(), Some("Test CA"));
        let node = make_node(&ca, "engine-1", &["localhost".into()], &["127.0.0.1".parse().unwrap()]).unwrap();
        let node_der = pem_cert_der(&node.cert_pem).unwrap();
        assert_eq!(subject_common_name(&node_der).as_deref(), Some("engine-1"));
        // The IP SAN verifies too, and a name not in the certificate does not.
        verify_node(&ca_der, &node_der, &[], &["127.0.0.1".parse().unwrap()]).unwrap();
        assert!(verify_node(&ca_der, &node_der, &["other.example".into()], &[]).is_err());
        // Another CA does not accept it.
        let other = make_ca("Other CA").unwrap();
        let other_der = pem_cert_der(&other.cert_pem).unwrap();
        assert!(verify_node(&other_der, &node_der, &["localhost".into()], &[]).is_err());
    }

    #[test]
    fn bad_inputs() {
        let ca = make_ca("Test CA").unwrap();
        assert!(matches!(make_node(&ca, "n", &[], &[]), Err(CertError::Invalid(_))));
        for bad in ["", "ca", "../x", "a/b", ".hidden", "sp ace"] {
            assert!(check_node_name(bad).is_err(), "{bad:?}");
        }
        assert!(make_node(&ca, "n", &["bad name!".into()], &[]).is_err());
        // A key that does not belong to the CA certificate: the result would not verify.
        let other = make_ca("Test CA").unwrap();
        let mixed = CaPem { cert_pem: ca.cert_pem.clone(), key_pem: other.key_pem };
        assert!(matches!(make_node(&mixed, "n", &["localhost".into()], &[]), Err(CertError::Invalid(_))));
    }

    #[test]
    fn files_modes_and_overwrite() {
        let dir = tmp_dir("files");
        let (ca_pem, ca_key) = write_ca(&dir, false).unwrap();
        assert!(matches!(write_ca(&dir, false), Err(CertError::Exists(_))));
        let (pem, key) = write_node(&dir, "edge", &["localhost".into()], &[], false).unwrap();
        assert_eq!(pem, dir.join("edge.pem"));
        assert!(matches!(write_node(&dir, "edge", &["localhost".into()], &[], false), Err(CertError::Exists(_))));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for k in [&ca_key, &key] {
                assert_eq!(fs::metadata(k).unwrap().permissions().mode() & 0o777, 0o600, "{k:?}");
            }
        }
        let before = fs::read_to_string(&key).unwrap();
        write_node(&dir, "edge", &["localhost".into()], &[], true).unwrap();
        assert_ne!(fs::read_to_string(&key).unwrap(), before);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        }
        write_ca(&dir, true).unwrap();
        assert!(fs::read_to_string(&ca_pem).unwrap().contains("BEGIN CERTIFICATE"));
        // No CA in an empty directory: the error names the file.
        let empty = tmp_dir("empty");
        fs::create_dir_all(&empty).unwrap();
        let err = write_node(&empty, "n", &["localhost".into()], &[], false).unwrap_err();
        assert!(err.to_string().contains("ca.pem"), "{err}");
        let _ = fs::remove_dir_all(&dir);
        let _ = fs::remove_dir_all(&empty);
    }
}
