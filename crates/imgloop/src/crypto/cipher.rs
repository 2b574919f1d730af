//! Sector ciphers as LUKS defines them: AES-128/192/256 in ECB, CBC, CTR
//! or XTS mode, each 512-byte sector with its own IV from the `plain`,
//! `plain64` or `essiv` generator. The block ciphers and modes are
//! RustCrypto's (`aes`, `cbc`, `ctr`, `xts-mode`); this file only picks
//! them and computes IVs.

use super::hash::HashAlg;
use crate::error::{Error, Result};
use aes::cipher::block_padding::NoPadding;
use aes::cipher::generic_array::GenericArray;
use aes::cipher::{
    BlockCipher, BlockDecrypt, BlockDecryptMut, BlockEncrypt, BlockEncryptMut, InnerIvInit,
    KeyInit, StreamCipher,
};
use aes::{Aes128, Aes192, Aes256};
use zeroize::Zeroizing;

/// Bytes per encrypted sector.
pub const SECTOR: usize = 512;

/// The block cipher and its key size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CipherAlg {
    /// AES with a 128-bit key.
    Aes128,
    /// AES with a 192-bit key.
    Aes192,
    /// AES with a 256-bit key.
    Aes256,
}

impl CipherAlg {
    /// The algorithm qemu's `cipher-alg` option names (`aes-256`, ...).
    pub fn from_option(name: &str) -> Option<CipherAlg> {
        match name {
            "aes-128" => Some(CipherAlg::Aes128),
            "aes-192" => Some(CipherAlg::Aes192),
            "aes-256" => Some(CipherAlg::Aes256),
            _ => None,
        }
    }

    /// The AES variant with a key of `len` bytes.
    pub fn aes_with_key_len(len: usize) -> Option<CipherAlg> {
        match len {
            16 => Some(CipherAlg::Aes128),
            24 => Some(CipherAlg::Aes192),
            32 => Some(CipherAlg::Aes256),
            _ => None,
        }
    }

    /// qemu's option name.
    pub fn option_name(self) -> &'static str {
        match self {
            CipherAlg::Aes128 => "aes-128",
            CipherAlg::Aes192 => "aes-192",
            CipherAlg::Aes256 => "aes-256",
        }
    }

    /// Bytes of a key.
    pub fn key_len(self) -> usize {
        match self {
            CipherAlg::Aes128 => 16,
            CipherAlg::Aes192 => 24,
            CipherAlg::Aes256 => 32,
        }
    }
}

/// The block cipher mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CipherMode {
    /// Electronic codebook (no IV).
    Ecb,
    /// Cipher block chaining, restarted at each sector.
    Cbc,
    /// XEX with ciphertext stealing; the key is two keys of the cipher's size.
    Xts,
    /// Counter mode, the counter a big-endian 128-bit number.
    Ctr,
}

impl CipherMode {
    /// The mode called `name`.
    pub fn from_name(name: &str) -> Option<CipherMode> {
        match name {
            "ecb" => Some(CipherMode::Ecb),
            "cbc" => Some(CipherMode::Cbc),
            "xts" => Some(CipherMode::Xts),
            "ctr" => Some(CipherMode::Ctr),
            _ => None,
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            CipherMode::Ecb => "ecb",
            CipherMode::Cbc => "cbc",
            CipherMode::Xts => "xts",
            CipherMode::Ctr => "ctr",
        }
    }
}

/// How each sector's IV is made from its number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IvGen {
    /// The low 32 bits of the sector number, little-endian, zero-padded.
    Plain,
    /// The sector number as a little-endian 64-bit value, zero-padded.
    Plain64,
    /// `plain64` encrypted with AES keyed by the hash of the key.
    Essiv(HashAlg),
}

impl IvGen {
    /// The generator called `name` (with `hash` for `essiv`).
    pub fn from_name(name: &str, hash: Option<HashAlg>) -> Option<IvGen> {
        match name {
            "plain" => Some(IvGen::Plain),
            "plain64" => Some(IvGen::Plain64),
            "essiv" => hash.map(IvGen::Essiv),
            _ => None,
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            IvGen::Plain => "plain",
            IvGen::Plain64 => "plain64",
            IvGen::Essiv(_) => "essiv",
        }
    }
}

/// One AES variant, keyed.
#[derive(Clone)]
enum Aes {
    A128(Aes128),
    A192(Aes192),
    A256(Aes256),
}

impl Aes {
    fn new(key: &[u8]) -> Result<Aes> {
        let bad = || Error::invalid_argument(format!("no AES cipher with key size {}", key.len()));
        Ok(match key.len() {
            16 => Aes::A128(Aes128::new_from_slice(key).map_err(|_| bad())?),
            24 => Aes::A192(Aes192::new_from_slice(key).map_err(|_| bad())?),
            32 => Aes::A256(Aes256::new_from_slice(key).map_err(|_| bad())?),
            _ => return Err(bad()),
        })
    }

    fn encrypt_block(&self, block: &mut [u8; 16]) {
        let b = GenericArray::from_mut_slice(block);
        match self {
            Aes::A128(c) => c.encrypt_block(b),
            Aes::A192(c) => c.encrypt_block(b),
            Aes::A256(c) => c.encrypt_block(b),
        }
    }
}

/// A keyed sector cipher.
pub struct SectorCipher {
    mode: CipherMode,
    ivgen: IvGen,
    /// The data key (for XTS, its first half).
    main: Aes,
    /// XTS: the tweak key (the second half).
    tweak: Option<Aes>,
    /// ESSIV: AES keyed by the hash of the whole key.
    essiv: Option<Aes>,
}

impl SectorCipher {
    /// The cipher `alg`/`mode`/`ivgen` with `key` (twice the cipher's key
    /// size for XTS).
    pub fn new(alg: CipherAlg, mode: CipherMode, ivgen: IvGen, key: &[u8]) -> Result<SectorCipher> {
        let want = alg.key_len() * if mode == CipherMode::Xts { 2 } else { 1 };
        if key.len() != want {
            return Err(Error::invalid_argument(format!(
                "a {}-{} key is {want} bytes, not {}",
                alg.option_name(),
                mode.name(),
                key.len()
            )));
        }
        let (main, tweak) = if mode == CipherMode::Xts {
            let (a, b) = key.split_at(key.len() / 2);
            (Aes::new(a)?, Some(Aes::new(b)?))
        } else {
            (Aes::new(key)?, None)
        };
        let essiv = match ivgen {
            IvGen::Essiv(h) => {
                let salt = Zeroizing::new(h.digest(&[key]));
                Some(Aes::new(&salt).map_err(|_| {
                    Error::invalid_argument(format!(
                        "No AES cipher with key size {} available (essiv with {})",
                        salt.len(),
                        h.name()
                    ))
                })?)
            }
            _ => None,
        };
        Ok(SectorCipher {
            mode,
            ivgen,
            main,
            tweak,
            essiv,
        })
    }

    fn iv(&self, sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match self.ivgen {
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvGen::Essiv(_) => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                if let Some(e) = &self.essiv {
                    e.encrypt_block(&mut iv);
                }
            }
        }
        iv
    }

    /// Encrypts `buf` (whole sectors) in place; its first sector is number
    /// `first`.
    pub fn encrypt(&self, buf: &mut [u8], first: u64) {
        self.run(buf, first, true)
    }

    /// Decrypts `buf` (whole sectors) in place; its first sector is number
    /// `first`.
    pub fn decrypt(&self, buf: &mut [u8], first: u64) {
        self.run(buf, first, false)
    }

    fn run(&self, buf: &mut [u8], first: u64, encrypt: bool) {
        debug_assert!(buf.len().is_multiple_of(SECTOR));
        for (i, sector) in buf.chunks_exact_mut(SECTOR).enumerate() {
            let iv = self.iv(first.wrapping_add(i as u64));
            match (&self.main, &self.tweak) {
                (Aes::A128(m), t) => sector_op(m, t.as_ref(), self.mode, iv, sector, encrypt),
                (Aes::A192(m), t) => sector_op(m, t.as_ref(), self.mode, iv, sector, encrypt),
                (Aes::A256(m), t) => sector_op(m, t.as_ref(), self.mode, iv, sector, encrypt),
            }
        }
    }
}

/// The tweak cipher of an XTS pair, as the same AES variant as `main`.
trait SameAes: Sized {
    fn from(a: &Aes) -> Option<&Self>;
}
impl SameAes for Aes128 {
    fn from(a: &Aes) -> Option<&Self> {
        match a {
            Aes::A128(c) => Some(c),
            _ => None,
        }
    }
}
impl SameAes for Aes192 {
    fn from(a: &Aes) -> Option<&Self> {
        match a {
            Aes::A192(c) => Some(c),
            _ => None,
        }
    }
}
impl SameAes for Aes256 {
    fn from(a: &Aes) -> Option<&Self> {
        match a {
            Aes::A256(c) => Some(c),
            _ => None,
        }
    }
}

fn sector_op<C>(
    main: &C,
    tweak: Option<&Aes>,
    mode: CipherMode,
    iv: [u8; 16],
    sector: &mut [u8],
    encrypt: bool,
) where
    C: BlockCipher
        + BlockEncrypt
        + BlockDecrypt
        + Clone
        + SameAes
        + aes::cipher::BlockSizeUser<BlockSize = aes::cipher::consts::U16>,
{
    match mode {
        CipherMode::Ecb => {
            for block in sector.chunks_exact_mut(16) {
                let b = GenericArray::from_mut_slice(block);
                if encrypt {
                    main.encrypt_block(b);
                } else {
                    main.decrypt_block(b);
                }
            }
        }
        CipherMode::Cbc => {
            let iv = GenericArray::from(iv);
            if encrypt {
                let _ = cbc::Encryptor::<C>::inner_iv_init(main.clone(), &iv)
                    .encrypt_padded_mut::<NoPadding>(sector, SECTOR);
            } else {
                let _ = cbc::Decryptor::<C>::inner_iv_init(main.clone(), &iv)
                    .decrypt_padded_mut::<NoPadding>(sector);
            }
        }
        CipherMode::Ctr => {
            let iv = GenericArray::from(iv);
            let core = ctr::CtrCore::<C, ctr::flavors::Ctr128BE>::inner_iv_init(main.clone(), &iv);
            ctr::Ctr128BE::<C>::from_core(core).apply_keystream(sector);
        }
        CipherMode::Xts => {
            let Some(t) = tweak.and_then(C::from) else {
                return;
            };
            let xts = xts_mode::Xts128::new(main.clone(), t.clone());
            if encrypt {
                xts.encrypt_sector(sector, iv);
            } else {
                xts.decrypt_sector(sector, iv);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::hash::tests::hex;

    #[test]
    fn xts_plain64_matches_the_ieee_1619_vector() {
        // IEEE 1619 XTS-AES-128 vector 2: keys 0x11.., 0x22..; sector
        // number 0x3333333333; 32 bytes of 0x44.
        let mut key = vec![0x11u8; 16];
        key.extend([0x22u8; 16]);
        let c =
            SectorCipher::new(CipherAlg::Aes128, CipherMode::Xts, IvGen::Plain64, &key).unwrap();
        let mut sector = [0x44u8; 512];
        c.encrypt(&mut sector, 0x3333333333);
        // The first 32 bytes depend only on the first 32 of the sector.
        assert_eq!(
            sector[..32].to_vec(),
            hex("c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0")
        );
        c.decrypt(&mut sector, 0x3333333333);
        assert!(sector.iter().all(|&b| b == 0x44));
    }

    #[test]
    fn every_mode_and_iv_generator_round_trips_and_depends_on_the_sector() {
        let plain: Vec<u8> = (0..2048).map(|i| (i * 7 % 256) as u8).collect();
        for alg in [CipherAlg::Aes128, CipherAlg::Aes192, CipherAlg::Aes256] {
            for mode in [
                CipherMode::Ecb,
                CipherMode::Cbc,
                CipherMode::Ctr,
                CipherMode::Xts,
            ] {
                for ivgen in [IvGen::Plain, IvGen::Plain64, IvGen::Essiv(HashAlg::Sha256)] {
                    let n = alg.key_len() * if mode == CipherMode::Xts { 2 } else { 1 };
                    let key: Vec<u8> = (0..n as u8).collect();
                    let c = SectorCipher::new(alg, mode, ivgen, &key).unwrap();
                    let mut a = plain.clone();
                    c.encrypt(&mut a, 5);
                    assert_ne!(a, plain);
                    let mut b = plain.clone();
                    c.encrypt(&mut b, 6);
                    if mode != CipherMode::Ecb {
                        assert_ne!(a[..512], b[..512], "{alg:?} {mode:?} {ivgen:?}");
                    }
                    c.decrypt(&mut a, 5);
                    assert_eq!(a, plain, "{alg:?} {mode:?} {ivgen:?}");
                }
            }
        }
        // ESSIV needs a hash whose digest is an AES key size.
        let key = [1u8; 32];
        let e = SectorCipher::new(
            CipherAlg::Aes256,
            CipherMode::Cbc,
            IvGen::Essiv(HashAlg::Sha1),
            &key,
        );
        assert!(e.is_err());
        // plain wraps at 2^32 sectors, plain64 does not.
        let c = SectorCipher::new(CipherAlg::Aes256, CipherMode::Cbc, IvGen::Plain, &key).unwrap();
        let (mut x, mut y) = ([3u8; 512], [3u8; 512]);
        c.encrypt(&mut x, 1);
        c.encrypt(&mut y, (1 << 32) + 1);
        assert_eq!(x, y);
        let c =
            SectorCipher::new(CipherAlg::Aes256, CipherMode::Cbc, IvGen::Plain64, &key).unwrap();
        let (mut x, mut y) = ([3u8; 512], [3u8; 512]);
        c.encrypt(&mut x, 1);
        c.encrypt(&mut y, (1 << 32) + 1);
        assert_ne!(x, y);
    }
}
