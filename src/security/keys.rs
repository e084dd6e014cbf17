//! Key and certificate generation for `tether keys` (a development CA, clinic and gateway
//! certificates, data keys). Private keys are written with mode 0600 on Unix.

use std::path::Path;

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::hash::MessageDigest;
use openssl::pkey::{HasPublic, PKey, PKeyRef, Private};
use openssl::rsa::Rsa;
use openssl::x509::extension::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName, SubjectKeyIdentifier,
};
use openssl::x509::{X509NameBuilder, X509ReqBuilder, X509};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("openssl: {0}")]
    Ssl(#[from] openssl::error::ErrorStack),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Client,
    Server,
}

pub struct Issued {
    pub cert: X509,
    pub key: PKey<Private>,
}

pub fn rsa_key(bits: u32) -> Result<PKey<Private>, KeyError> {
    Ok(PKey::from_rsa(Rsa::generate(bits)?)?)
}

fn serial() -> Result<openssl::asn1::Asn1Integer, KeyError> {
    let mut bn = BigNum::new()?;
    bn.rand(127, MsbOption::MAYBE_ZERO, false)?;
    Ok(bn.to_asn1_integer()?)
}

/// A v3 certificate builder with a fresh serial and subject `CN=cn, O=Tether`.
fn builder(cn: &str) -> Result<(openssl::x509::X509Builder, openssl::x509::X509Name), KeyError> {
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_text("CN", cn)?;
    name.append_entry_by_text("O", "Tether")?;
    let name = name.build();
    let mut b = X509::builder()?;
    b.set_version(2)?;
    let sn = serial()?;
    b.set_serial_number(&sn)?;
    b.set_subject_name(&name)?;
    Ok((b, name))
}

/// A self-signed CA.
pub fn make_ca(cn: &str, days: u32, bits: u32) -> Result<Issued, KeyError> {
    let key = rsa_key(bits)?;
    let (mut b, name) = builder(cn)?;
    b.set_issuer_name(&name)?;
    b.set_pubkey(&key)?;
    let (nb, na) = (Asn1Time::days_from_now(0)?, Asn1Time::days_from_now(days)?);
    b.set_not_before(&nb)?;
    b.set_not_after(&na)?;
    b.append_extension(BasicConstraints::new().critical().ca().build()?)?;
    b.append_extension(
        KeyUsage::new()
            .critical()
            .key_cert_sign()
            .crl_sign()
            .build()?,
    )?;
    let ski = SubjectKeyIdentifier::new().build(&b.x509v3_context(None, None))?;
    b.append_extension(ski)?;
    b.sign(&key, MessageDigest::sha256())?;
    Ok(Issued {
        cert: b.build(),
        key,
    })
}

/// What a leaf certificate says.
#[derive(Debug, Clone, Copy)]
pub struct Leaf<'a> {
    pub cn: &'a str,
    pub dns: &'a [&'a str],
    pub ips: &'a [&'a str],
    pub usage: Usage,
    pub days: u32,
    /// (not_before, not_after) in Unix seconds; `None` means from now for `days`.
    pub valid: Option<(i64, i64)>,
    pub bits: u32,
}

impl<'a> Leaf<'a> {
    pub fn new(cn: &'a str, usage: Usage, bits: u32) -> Self {
        Leaf {
            cn,
            dns: &[],
            ips: &[],
            usage,
            days: 825,
            valid: None,
            bits,
        }
    }
}

/// A leaf certificate signed by `ca`, with a new key.
pub fn issue(ca: &Issued, leaf: &Leaf<'_>) -> Result<Issued, KeyError> {
    let key = rsa_key(leaf.bits)?;
    let cert = sign_leaf(ca, leaf, &key)?;
    Ok(Issued { cert, key })
}

/// A leaf certificate signed by `ca` for a public key made elsewhere (a certificate request's:
/// the private key never leaves the clinic PC). `leaf.bits` is not used.
pub fn sign_leaf<T: HasPublic>(
    ca: &Issued,
    leaf: &Leaf<'_>,
    key: &PKeyRef<T>,
) -> Result<X509, KeyError> {
    let Leaf {
        cn,
        dns,
        ips,
        usage,
        days,
        valid,
        bits: _,
    } = *leaf;
    let (mut b, _) = builder(cn)?;
    b.set_issuer_name(ca.cert.subject_name())?;
    b.set_pubkey(key)?;
    match valid {
        Some((from, to)) => {
            let (nb, na) = (Asn1Time::from_unix(from)?, Asn1Time::from_unix(to)?);
            b.set_not_before(&nb)?;
            b.set_not_after(&na)?;
        }
        None => {
            let (nb, na) = (Asn1Time::days_from_now(0)?, Asn1Time::days_from_now(days)?);
            b.set_not_before(&nb)?;
            b.set_not_after(&na)?;
        }
    }
    b.append_extension(BasicConstraints::new().build()?)?;
    b.append_extension(
        KeyUsage::new()
            .critical()
            .digital_signature()
            .key_encipherment()
            .build()?,
    )?;
    let eku = match usage {
        Usage::Client => ExtendedKeyUsage::new().client_auth().build()?,
        Usage::Server => ExtendedKeyUsage::new().server_auth().build()?,
    };
    b.append_extension(eku)?;
    if !dns.is_empty() || !ips.is_empty() {
        let mut san = SubjectAlternativeName::new();
        for d in dns {
            san.dns(d);
        }
        for ip in ips {
            san.ip(ip);
        }
        let ext = san.build(&b.x509v3_context(Some(&ca.cert), None))?;
        b.append_extension(ext)?;
    }
    b.sign(&ca.key, MessageDigest::sha256())?;
    Ok(b.build())
}

/// A key's own id: `<clinic>-<the first 16 hex digits of the SHA-256 of its public key>`
/// (DER SubjectPublicKeyInfo). The gateway names an enrolled key so, and an agent whose config
/// has no `auth.kid` computes the same from its private key: a renewed key needs no config edit.
pub fn key_id<T: HasPublic>(clinic: &str, key: &PKeyRef<T>) -> Result<String, KeyError> {
    let der = key.public_key_to_der()?;
    let digest = openssl::sha::sha256(&der);
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{clinic}-{hex}"))
}

/// A certificate request (PEM) for `key`, subject `CN=clinic`, signed with it.
pub fn csr(clinic: &str, key: &PKey<Private>) -> Result<String, KeyError> {
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_text("CN", clinic)?;
    let name = name.build();
    let mut b = X509ReqBuilder::new()?;
    b.set_subject_name(&name)?;
    b.set_pubkey(key)?;
    b.sign(key, MessageDigest::sha256())?;
    Ok(String::from_utf8_lossy(&b.build().to_pem()?).into_owned())
}

/// Writes a file whole: a temporary file beside it, renamed over it (private: mode 0600).
pub fn write_file(path: &Path, bytes: &[u8], private: bool) -> Result<(), KeyError> {
    let io = |source| KeyError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    write(&tmp, bytes, private)?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn write(path: &Path, bytes: &[u8], private: bool) -> Result<(), KeyError> {
    let io = |source| KeyError::Io {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    std::fs::write(path, bytes).map_err(io)?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    #[cfg(not(unix))]
    let _ = private;
    Ok(())
}

/// Writes `<base>.pem` (certificate) and `<base>.key` (PKCS#8 private key).
pub fn save(issued: &Issued, dir: &Path, base: &str) -> Result<(), KeyError> {
    write(
        &dir.join(format!("{base}.pem")),
        &issued.cert.to_pem()?,
        false,
    )?;
    write(
        &dir.join(format!("{base}.key")),
        &issued.key.private_key_to_pem_pkcs8()?,
        true,
    )
}

pub fn load(dir: &Path, base: &str) -> Result<Issued, KeyError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| KeyError::Io {
            path: p.display().to_string(),
            source,
        })
    };
    let cert = X509::from_pem(&read(&dir.join(format!("{base}.pem")))?)?;
    let key = PKey::private_key_from_pem(&read(&dir.join(format!("{base}.key")))?)?;
    Ok(Issued { cert, key })
}

/// A 256-bit data key, written base64-encoded.
pub fn write_data_key(path: &Path) -> Result<(), KeyError> {
    let mut key = [0u8; 32];
    openssl::rand::rand_bytes(&mut key)?;
    let text = openssl::base64::encode_block(&key);
    write(path, format!("{text}\n").as_bytes(), true)
}

/// The clinic registry entry (YAML) for a clinic certificate.
pub fn registry_entry(clinic: &str, kid: &str, cert: &X509) -> Result<String, KeyError> {
    let pem = String::from_utf8_lossy(&cert.public_key()?.public_key_to_pem()?).to_string();
    let indented: String = pem.lines().map(|l| format!("      {l}\n")).collect();
    Ok(format!(
        "clinic_id: {clinic}\nkeys:\n  - kid: {kid}\n    algorithms: [RS256]\n    public_key: |\n{indented}"
    ))
}

/// Everything a local TLS + JWT set-up needs, in `dir`: `ca`, `gateway`, one certificate per
/// clinic, registry entries under `clinics/`, and a data key `dk1.key`.
pub fn dev_setup(dir: &Path, clinics: &[String], bits: u32) -> Result<(), KeyError> {
    let ca = make_ca("Tether Dev CA", 3650, bits)?;
    save(&ca, dir, "ca")?;
    let gw = issue(
        &ca,
        &Leaf {
            dns: &["localhost"],
            ips: &["127.0.0.1"],
            days: 825,
            valid: None,
            ..Leaf::new("localhost", Usage::Server, bits)
        },
    )?;
    save(&gw, dir, "gateway")?;
    for c in clinics {
        let cert = issue(
            &ca,
            &Leaf {
                dns: &[c.as_str()],
                ..Leaf::new(c, Usage::Client, bits)
            },
        )?;
        save(&cert, dir, c)?;
        let entry = registry_entry(c, &format!("{c}-1"), &cert.cert)?;
        write(
            &dir.join("clinics").join(format!("{c}.yaml")),
            entry.as_bytes(),
            false,
        )?;
    }
    write_data_key(&dir.join("dk1.key"))
}
