//! The signing key the admin configures (`signing_key` in pkgsrc.toml), and
//! its public half that `buildcage verify` checks with: ed25519, stored as
//! PEM (PKCS#8 and SubjectPublicKeyInfo), as `openssl genpkey -algorithm
//! ed25519` makes them too.

use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use ed25519_dalek::{
    SigningKey, VerifyingKey,
    pkcs8::{
        DecodePrivateKey as _, DecodePublicKey as _, EncodePrivateKey as _, EncodePublicKey as _,
        spki::der::pem::LineEnding,
    },
};

/// Where `keygen` puts the key pair when no path is given, and where
/// `verify` looks for the public key.
pub const DEFAULT_KEY: &str = "/etc/buildcage/provenance.key";
pub const DEFAULT_PUBLIC: &str = "/etc/buildcage/provenance.pub";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the {what} {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is no ed25519 {what} in PEM: {why}")]
    Parse {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot draw a random key")]
    Random,
}

impl crate::hint::Hint for KeyError {
    fn hint(&self) -> Option<String> {
        Some(match self {
            Self::Read { what: "signing key", .. } => "the process that signs is the one that ran the `package` phase; it must be root (pbulk's pkg-build packages as root), the key its file, mode 0600. Or remove `signing_key` from pkgsrc.toml to sign nothing".to_owned(),
            Self::Read { .. } => "pass the public key with --key (`buildcage keygen` wrote it beside the private key, as .pub)".to_owned(),
            Self::Parse { .. } => "make a key pair with `buildcage keygen PATH` (or `openssl genpkey -algorithm ed25519`)".to_owned(),
            Self::Write { .. } => "choose a path in an existing directory where no file is yet: keygen never overwrites a key".to_owned(),
            Self::Random => "the kernel's random number generator failed; try again".to_owned(),
        })
    }
}

/// Reads the private key at `path`.
pub fn signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let what = "signing key";
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    SigningKey::from_pkcs8_pem(&text).map_err(|e| KeyError::Parse {
        what,
        path: path.to_owned(),
        why: e.to_string(),
    })
}

/// Reads the public key at `path`.
pub fn verifying_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let what = "public key";
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    VerifyingKey::from_public_key_pem(&text).map_err(|e| KeyError::Parse {
        what,
        path: path.to_owned(),
        why: e.to_string(),
    })
}

/// The public key's path beside a private key's: `provenance.key` →
/// `provenance.pub`.
pub fn public_path(private: &Path) -> PathBuf {
    private.with_extension("pub")
}

/// Makes a key pair: the private key at `path` (mode 0600, never over an
/// existing file) and the public one at [`public_path`]. Returns the public
/// key.
pub fn generate(path: &Path) -> Result<VerifyingKey, KeyError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|_| KeyError::Random)?;
    let key = SigningKey::from_bytes(&seed);
    seed.fill(0);
    let private = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| KeyError::Parse {
            what: "signing key",
            path: path.to_owned(),
            why: e.to_string(),
        })?;
    let public = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| KeyError::Parse {
            what: "public key",
            path: path.to_owned(),
            why: e.to_string(),
        })?;
    write_new(path, private.as_bytes(), 0o600)?;
    write_new(&public_path(path), public.as_bytes(), 0o644)?;
    Ok(key.verifying_key())
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    let err = |source| KeyError::Write {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_pair_reads_back_and_is_never_overwritten() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("buildcage-keygen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("provenance.key");
        let public = generate(&path).unwrap();
        assert_eq!(signing_key(&path).unwrap().verifying_key(), public);
        assert_eq!(verifying_key(&dir.join("provenance.pub")).unwrap(), public);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(generate(&path), Err(KeyError::Write { .. })));
        // A public key is no private one, and the other way round.
        assert!(matches!(
            signing_key(&dir.join("provenance.pub")),
            Err(KeyError::Parse { .. })
        ));
        assert!(matches!(verifying_key(&path), Err(KeyError::Parse { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
