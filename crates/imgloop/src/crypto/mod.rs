//! Cryptography for encrypted formats: LUKS1 volumes ([`luks`]) with
//! their sector ciphers ([`cipher`]), hashes and PBKDF2 ([`hash`]) and the
//! anti-forensic splitter ([`afsplit`]). The primitives are RustCrypto's;
//! nothing here implements a cipher or a hash.

pub mod afsplit;
pub mod cipher;
pub mod hash;
pub mod luks;
