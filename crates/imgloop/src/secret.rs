//! Secrets (passwords, keys) handed to drivers by ID, the way qemu-img's
//! `--object secret,id=ID,...` objects are named by `encrypt.key-secret=ID`.
//!
//! A [`Secret`] never shows its bytes in `Debug` output or error messages,
//! and its memory is zeroed when it is dropped.

use crate::error::{Error, ErrorKind, Result};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use zeroize::Zeroizing;

/// The bytes of one secret.
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    /// A secret holding `bytes`.
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(Zeroizing::new(bytes))
    }

    /// The secret's bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The secret as UTF-8 text, as qemu requires of passwords.
    pub fn as_utf8(&self, id: &str) -> Result<&str> {
        std::str::from_utf8(&self.0).map_err(|_| {
            Error::invalid_argument(format!("Data from secret {id} is not valid UTF-8"))
        })
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Secrets by ID. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Secrets(BTreeMap<String, Arc<Secret>>);

impl Secrets {
    /// No secrets.
    pub fn new() -> Secrets {
        Secrets::default()
    }

    /// Adds (or replaces) the secret `id`.
    pub fn insert(&mut self, id: impl Into<String>, secret: Secret) {
        self.0.insert(id.into(), Arc::new(secret));
    }

    /// The secret `id`, or qemu's error for a missing one.
    pub fn get(&self, id: &str) -> Result<&Secret> {
        self.0
            .get(id)
            .map(|s| &**s)
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("No secret with id '{id}'")))
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_bytes() {
        let mut s = Secrets::new();
        s.insert("sec0", Secret::new(b"hunter2".to_vec()));
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("sec0"));
        assert_eq!(s.get("sec0").unwrap().expose(), b"hunter2");
        let e = s.get("sec1").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.to_string().contains("No secret with id 'sec1'"));
    }

    #[test]
    fn passwords_must_be_utf8() {
        let s = Secret::new(vec![0xff, 0xfe]);
        assert!(s
            .as_utf8("k")
            .unwrap_err()
            .to_string()
            .contains("not valid UTF-8"));
    }
}
