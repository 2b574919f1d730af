//! qcow's legacy encryption (crypt method 1): AES-128 in CBC mode over
//! each 512-byte sector, the IV being the guest sector number as a
//! little-endian 64-bit value padded with zeroes ("plain64"), the key the
//! password's first 16 bytes (up to its first NUL), zero-padded.
//!
//! The format stores nothing to check a key against: a wrong password
//! decrypts to garbage and cannot be detected.

use crate::error::{Error, Result};
use crate::secret::Secret;
use aes::cipher::block_padding::NoPadding;
use aes::cipher::{BlockDecryptMut, BlockEncryptMut, InnerIvInit, KeyInit};
use aes::Aes128;

/// Bytes per encrypted unit.
pub const SECTOR: u64 = 512;

/// The cipher of one image.
pub struct SectorCipher {
    aes: Aes128,
}

impl SectorCipher {
    /// The cipher for password `secret` (named `id` in messages).
    pub fn from_password(secret: &Secret, id: &str) -> Result<SectorCipher> {
        let password = secret.as_utf8(id)?.as_bytes();
        let len = password
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(password.len())
            .min(16);
        let mut key = zeroize::Zeroizing::new([0u8; 16]);
        key[..len].copy_from_slice(&password[..len]);
        let aes = Aes128::new_from_slice(&key[..])
            .map_err(|_| Error::invalid_argument("AES-128 needs a 16-byte key"))?;
        Ok(SectorCipher { aes })
    }

    fn iv(sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        iv[..8].copy_from_slice(&sector.to_le_bytes());
        iv
    }

    /// Encrypts `buf` (whole sectors) in place; its first sector is guest
    /// sector `first`.
    pub fn encrypt(&self, buf: &mut [u8], first: u64) {
        debug_assert!((buf.len() as u64).is_multiple_of(SECTOR));
        for (i, sector) in buf.chunks_exact_mut(SECTOR as usize).enumerate() {
            let iv = Self::iv(first + i as u64);
            cbc::Encryptor::<Aes128>::inner_iv_init(self.aes.clone(), &iv.into())
                .encrypt_padded_mut::<NoPadding>(sector, SECTOR as usize)
                .expect("a whole sector needs no padding");
        }
    }

    /// Decrypts `buf` (whole sectors) in place; its first sector is guest
    /// sector `first`.
    pub fn decrypt(&self, buf: &mut [u8], first: u64) {
        debug_assert!((buf.len() as u64).is_multiple_of(SECTOR));
        for (i, sector) in buf.chunks_exact_mut(SECTOR as usize).enumerate() {
            let iv = Self::iv(first + i as u64);
            cbc::Decryptor::<Aes128>::inner_iv_init(self.aes.clone(), &iv.into())
                .decrypt_padded_mut::<NoPadding>(sector)
                .expect("a whole sector needs no padding");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sectors_round_trip_and_depend_on_key_and_sector_number() {
        let c = SectorCipher::from_password(&Secret::new(b"abc".to_vec()), "k").unwrap();
        let plain: Vec<u8> = (0..1024).map(|i| (i % 251) as u8).collect();
        let mut a = plain.clone();
        c.encrypt(&mut a, 7);
        assert_ne!(a, plain);
        let mut b = plain.clone();
        c.encrypt(&mut b, 8);
        assert_ne!(a[..512], b[..512], "the IV is the sector number");
        c.decrypt(&mut a, 7);
        assert_eq!(a, plain);
        // Only the first 16 bytes of the password count.
        let long = SectorCipher::from_password(&Secret::new(b"0123456789abcdefXYZ".to_vec()), "k")
            .unwrap();
        let cut =
            SectorCipher::from_password(&Secret::new(b"0123456789abcdef".to_vec()), "k").unwrap();
        let (mut x, mut y) = (plain.clone(), plain.clone());
        long.encrypt(&mut x, 0);
        cut.encrypt(&mut y, 0);
        assert_eq!(x, y);
    }
}
