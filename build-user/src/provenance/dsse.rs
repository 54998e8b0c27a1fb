//! DSSE, the envelope in-toto attestations travel in
//! (<https://github.com/secure-systems-lab/dsse/blob/master/protocol.md>):
//! the payload, its type, and signatures over the pre-authentication
//! encoding (PAE) of both, so that a signature over one type of payload can
//! never be taken for one over another.

use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use sha2::Digest as _;

/// The payload type of an in-toto Statement.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";

/// `PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`,
/// lengths in ASCII decimal.
pub fn pae(payload_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// A DSSE envelope, as JSON.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// Base64 (standard, padded) of the payload.
    pub payload: String,
    pub payload_type: String,
    pub signatures: Vec<EnvelopeSignature>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EnvelopeSignature {
    /// Which key signed: [`key_id`] of its public half.
    pub keyid: String,
    /// Base64 of the ed25519 signature over the PAE.
    pub sig: String,
}

/// Why an envelope is not one `key` signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("its payload type is {0:?}, not {PAYLOAD_TYPE:?}")]
    PayloadType(String),
    #[error("its payload is not base64")]
    Payload,
    #[error("it carries no signature by key {0}")]
    NoSignature(String),
    #[error(
        "its signature by key {0} does not verify: the statement was changed, or signed by another key"
    )]
    BadSignature(String),
}

/// A key's id: the hex SHA-256 of its 32 public bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    hex(&sha2::Sha256::digest(key.as_bytes()))
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

impl Envelope {
    /// Signs `payload` (of type [`PAYLOAD_TYPE`]) with `key`.
    pub fn sign(payload: &[u8], key: &SigningKey) -> Self {
        let sig = key.sign(&pae(PAYLOAD_TYPE, payload));
        let b64 = base64::engine::general_purpose::STANDARD;
        Self {
            payload: b64.encode(payload),
            payload_type: PAYLOAD_TYPE.to_owned(),
            signatures: vec![EnvelopeSignature {
                keyid: key_id(&key.verifying_key()),
                sig: b64.encode(sig.to_bytes()),
            }],
        }
    }

    /// The payload, once a signature of `key`'s over it verifies (strictly:
    /// no malleable signature, no weak key).
    pub fn open(&self, key: &VerifyingKey) -> Result<Vec<u8>, OpenError> {
        if self.payload_type != PAYLOAD_TYPE {
            return Err(OpenError::PayloadType(self.payload_type.clone()));
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let payload = b64.decode(&self.payload).map_err(|_| OpenError::Payload)?;
        let id = key_id(key);
        // The key id is a hint, not a trust decision: every signature is
        // tried against the one key given.
        let mut tried = false;
        for s in &self.signatures {
            let Ok(bytes) = b64.decode(&s.sig) else {
                continue;
            };
            let Ok(sig) = ed25519_dalek::Signature::from_slice(&bytes) else {
                continue;
            };
            tried = true;
            if key
                .verify_strict(&pae(&self.payload_type, &payload), &sig)
                .is_ok()
            {
                return Ok(payload);
            }
        }
        Err(if tried {
            OpenError::BadSignature(id)
        } else {
            OpenError::NoSignature(id)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn pae_is_the_specs() {
        // The example of DSSE's protocol.md.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ");
    }

    #[test]
    fn a_signature_round_trips_and_nothing_else_verifies() {
        let k = key(7);
        let env = Envelope::sign(b"{\"a\":1}", &k);
        assert_eq!(env.open(&k.verifying_key()).unwrap(), b"{\"a\":1}");
        let json = serde_json::to_string(&env).unwrap();
        assert!(json.contains("\"payloadType\":\"application/vnd.in-toto+json\""));
        let back: Envelope = serde_json::from_str(&json).unwrap();
        assert_eq!(back, env);

        let other = key(8).verifying_key();
        assert_eq!(
            env.open(&other),
            Err(OpenError::BadSignature(key_id(&other)))
        );

        let mut changed = env.clone();
        changed.payload = base64::engine::general_purpose::STANDARD.encode(b"{\"a\":2}");
        assert!(matches!(
            changed.open(&k.verifying_key()),
            Err(OpenError::BadSignature(_))
        ));

        let mut retyped = env.clone();
        retyped.payload_type = "application/json".to_owned();
        assert!(matches!(
            retyped.open(&k.verifying_key()),
            Err(OpenError::PayloadType(_))
        ));

        let mut unsigned = env;
        unsigned.signatures.clear();
        assert!(matches!(
            unsigned.open(&k.verifying_key()),
            Err(OpenError::NoSignature(_))
        ));
    }
}
