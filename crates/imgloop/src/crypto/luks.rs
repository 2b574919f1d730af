//! LUKS1 volumes (the header and key slots of the LUKS on-disk format,
//! version 1, as cryptsetup and qemu write them): parsing and checking a
//! header, unlocking the master key with a passphrase, and making a new
//! header with one active key slot.

use super::afsplit;
use super::cipher::{CipherAlg, CipherMode, IvGen, SectorCipher, SECTOR};
use super::hash::HashAlg;
use crate::error::{Error, ErrorKind, Result};
use zeroize::Zeroizing;

/// The magic at byte 0.
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// Bytes of the header proper.
pub const HEADER_LEN: usize = 592;
/// Stripes of the anti-forensic splitter in every key slot (qemu opens
/// nothing else).
pub const STRIPES: u32 = 4000;
/// Key slots in a header.
pub const SLOTS: usize = 8;
/// A key slot in use.
const SLOT_ACTIVE: u32 = 0x00AC_71F3;
/// A key slot not in use.
const SLOT_INACTIVE: u32 = 0x0000_DEAD;
/// Sectors before the first key slot's material (4 KiB).
const HEADER_SECTORS: u32 = 8;
/// Bytes of the master key digest.
const DIGEST_LEN: usize = 20;
/// Fewest PBKDF2 iterations qemu writes.
const MIN_ITERATIONS: u64 = 1000;

/// One key slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySlot {
    /// The slot holds a copy of the master key.
    pub active: bool,
    /// PBKDF2 iterations for the passphrase.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: [u8; 32],
    /// Where the slot's key material starts, in 512-byte sectors from the
    /// start of the header.
    pub key_offset: u32,
    /// Anti-forensic stripes (always 4000).
    pub stripes: u32,
}

/// What the names in a header mean.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CipherSpec {
    /// The block cipher.
    pub alg: CipherAlg,
    /// Its mode.
    pub mode: CipherMode,
    /// The IV generator.
    pub ivgen: IvGen,
    /// The hash of PBKDF2 and the splitter.
    pub hash: HashAlg,
}

impl CipherSpec {
    /// qemu-img's default: aes-256, xts, plain64, sha256.
    pub const DEFAULT: CipherSpec = CipherSpec {
        alg: CipherAlg::Aes256,
        mode: CipherMode::Xts,
        ivgen: IvGen::Plain64,
        hash: HashAlg::Sha256,
    };

    /// Bytes of the master key.
    pub fn key_bytes(&self) -> usize {
        self.alg.key_len() * if self.mode == CipherMode::Xts { 2 } else { 1 }
    }

    /// The header's `cipher_mode` string (`xts-plain64`, `cbc-essiv:sha256`).
    pub fn mode_string(&self) -> String {
        match self.ivgen {
            IvGen::Essiv(h) => format!("{}-essiv:{}", self.mode.name(), h.name()),
            g => format!("{}-{}", self.mode.name(), g.name()),
        }
    }

    /// The sector cipher keyed with `key`.
    pub fn cipher(&self, key: &[u8]) -> Result<SectorCipher> {
        SectorCipher::new(self.alg, self.mode, self.ivgen, key)
    }
}

/// A LUKS1 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LuksHeader {
    /// `cipher_name` (`aes`).
    pub cipher_name: String,
    /// `cipher_mode` (`xts-plain64`).
    pub cipher_mode: String,
    /// `hash_spec` (`sha256`).
    pub hash_spec: String,
    /// Where the payload starts, in sectors (qcow2 does not use it).
    pub payload_offset: u32,
    /// Bytes of the master key.
    pub key_bytes: u32,
    /// PBKDF2 of the master key, for checking a candidate.
    pub mk_digest: [u8; DIGEST_LEN],
    /// Its salt.
    pub mk_digest_salt: [u8; 32],
    /// Its iterations.
    pub mk_digest_iterations: u32,
    /// The volume's UUID, as text.
    pub uuid: String,
    /// The key slots.
    pub slots: Vec<KeySlot>,
    /// What the names mean.
    pub spec: CipherSpec,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// A NUL-terminated string field.
fn text(b: &[u8], what: &str) -> Result<String> {
    let end = b.iter().position(|&c| c == 0).ok_or_else(|| {
        Error::invalid_format(
            "LUKS header",
            0,
            format!("LUKS header {what} is not NUL terminated"),
        )
    })?;
    Ok(String::from_utf8_lossy(&b[..end]).into_owned())
}

fn bad(what: String) -> Error {
    Error::invalid_format("LUKS header", 0, what)
}

/// Sectors one key slot's material takes, rounded up to 4 KiB.
pub fn slot_sectors(key_bytes: u64) -> u64 {
    (key_bytes * STRIPES as u64)
        .div_ceil(SECTOR as u64)
        .next_multiple_of(HEADER_SECTORS as u64)
}

/// Parses the cipher names of a header.
fn parse_spec(name: &str, mode: &str, hash: &str, key_bytes: u32) -> Result<CipherSpec> {
    let unsupported = |m: String| Error::new(ErrorKind::Unsupported, m);
    let (mode_name, ivgen_text) = mode
        .split_once('-')
        .ok_or_else(|| bad(format!("Unexpected cipher mode string format '{mode}'")))?;
    let cmode = CipherMode::from_name(mode_name)
        .ok_or_else(|| unsupported(format!("Cipher mode {mode_name} not supported")))?;
    let (ivgen_name, ivhash) = match ivgen_text.split_once(':') {
        Some((g, h)) => (g, Some(h)),
        None => (ivgen_text, None),
    };
    let ivhash = match ivhash {
        Some(h) => Some(
            HashAlg::from_name(h)
                .ok_or_else(|| unsupported(format!("Hash algorithm '{h}' not supported")))?,
        ),
        None => None,
    };
    if ivgen_name == "essiv" && ivhash.is_none() {
        return Err(bad("Missing IV generator hash specification".into()));
    }
    let ivgen = IvGen::from_name(ivgen_name, ivhash)
        .ok_or_else(|| unsupported(format!("IV generator {ivgen_name} not supported")))?;
    let hash = HashAlg::from_name(hash)
        .ok_or_else(|| unsupported(format!("Hash algorithm '{hash}' not supported")))?;
    let per_key = if cmode == CipherMode::Xts {
        key_bytes / 2
    } else {
        key_bytes
    };
    let alg = (name == "aes")
        .then(|| CipherAlg::aes_with_key_len(per_key as usize))
        .flatten()
        .filter(|_| cmode != CipherMode::Xts || key_bytes.is_multiple_of(2))
        .ok_or_else(|| {
            unsupported(format!(
                "Algorithm {name} with key size {per_key} bytes not supported (imgloop has AES)"
            ))
        })?;
    Ok(CipherSpec {
        alg,
        mode: cmode,
        ivgen,
        hash,
    })
}

impl LuksHeader {
    /// Parses and checks a header, with qemu's messages for what it refuses.
    pub fn parse(b: &[u8]) -> Result<LuksHeader> {
        if b.len() < HEADER_LEN || b[..6] != MAGIC {
            return Err(bad("Volume is not in LUKS format".into()));
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("LUKS version {version} is not supported"),
            ));
        }
        let cipher_name = text(&b[8..40], "cipher name")?;
        let cipher_mode = text(&b[40..72], "cipher mode")?;
        let hash_spec = text(&b[72..104], "hash spec")?;
        let payload_offset = be32(b, 104);
        let key_bytes = be32(b, 108);
        let mut mk_digest = [0u8; DIGEST_LEN];
        mk_digest.copy_from_slice(&b[112..132]);
        let mut mk_digest_salt = [0u8; 32];
        mk_digest_salt.copy_from_slice(&b[132..164]);
        let mk_digest_iterations = be32(b, 164);
        let uuid = String::from_utf8_lossy(&b[168..208])
            .trim_end_matches('\0')
            .to_string();
        if payload_offset < HEADER_SECTORS {
            return Err(bad("LUKS payload is overlapping with the header".into()));
        }
        if mk_digest_iterations == 0 {
            return Err(bad("LUKS key iteration count is zero".into()));
        }
        let span = slot_sectors(key_bytes as u64);
        let mut slots = Vec::with_capacity(SLOTS);
        for i in 0..SLOTS {
            let at = 208 + 48 * i;
            let state = be32(b, at);
            let mut salt = [0u8; 32];
            salt.copy_from_slice(&b[at + 8..at + 40]);
            let slot = KeySlot {
                active: state == SLOT_ACTIVE,
                iterations: be32(b, at + 4),
                salt,
                key_offset: be32(b, at + 40),
                stripes: be32(b, at + 44),
            };
            if slot.stripes != STRIPES {
                return Err(bad(format!(
                    "Keyslot {i} is corrupted (stripes {} != {STRIPES})",
                    slot.stripes
                )));
            }
            if state != SLOT_ACTIVE && state != SLOT_INACTIVE {
                return Err(bad(format!(
                    "Keyslot {i} state (active/disable) is corrupted"
                )));
            }
            if slot.active && slot.iterations == 0 {
                return Err(bad(format!("Keyslot {i} iteration count is zero")));
            }
            if slot.key_offset < HEADER_SECTORS {
                return Err(bad(format!(
                    "Keyslot {i} is overlapping with the LUKS header"
                )));
            }
            if slot.key_offset as u64 + span > payload_offset as u64 {
                return Err(bad(format!(
                    "Keyslot {i} is overlapping with the encrypted payload"
                )));
            }
            for (j, other) in slots.iter().enumerate() {
                let o: &KeySlot = other;
                let (a, b2) = (slot.key_offset as u64, o.key_offset as u64);
                if a < b2 + span && b2 < a + span {
                    return Err(bad(format!(
                        "Keyslots {j} and {i} are overlapping in the header"
                    )));
                }
            }
            slots.push(slot);
        }
        let spec = parse_spec(&cipher_name, &cipher_mode, &hash_spec, key_bytes)?;
        Ok(LuksHeader {
            cipher_name,
            cipher_mode,
            hash_spec,
            payload_offset,
            key_bytes,
            mk_digest,
            mk_digest_salt,
            mk_digest_iterations,
            uuid,
            slots,
            spec,
        })
    }

    /// The header's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[..6].copy_from_slice(&MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        let put = |b: &mut [u8], at: usize, s: &str| {
            let n = s.len().min(31);
            b[at..at + n].copy_from_slice(&s.as_bytes()[..n]);
        };
        put(&mut b, 8, &self.cipher_name);
        put(&mut b, 40, &self.cipher_mode);
        put(&mut b, 72, &self.hash_spec);
        b[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_digest_salt);
        b[164..168].copy_from_slice(&self.mk_digest_iterations.to_be_bytes());
        let n = self.uuid.len().min(39);
        b[168..168 + n].copy_from_slice(&self.uuid.as_bytes()[..n]);
        for (i, s) in self.slots.iter().enumerate() {
            let at = 208 + 48 * i;
            let state = if s.active { SLOT_ACTIVE } else { SLOT_INACTIVE };
            b[at..at + 4].copy_from_slice(&state.to_be_bytes());
            b[at + 4..at + 8].copy_from_slice(&s.iterations.to_be_bytes());
            b[at + 8..at + 40].copy_from_slice(&s.salt);
            b[at + 40..at + 44].copy_from_slice(&s.key_offset.to_be_bytes());
            b[at + 44..at + 48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        b
    }

    /// Bytes of one slot's key material as stored (whole sectors).
    fn material_len(&self) -> usize {
        (self.key_bytes as usize * STRIPES as usize).next_multiple_of(SECTOR)
    }

    /// Unlocks the master key with `passphrase`; `read(offset, buf)` reads
    /// the volume (offsets from the start of the header).
    pub fn unlock(
        &self,
        passphrase: &[u8],
        read: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let kb = self.key_bytes as usize;
        for slot in self.slots.iter().filter(|s| s.active) {
            let mut slot_key = Zeroizing::new(vec![0u8; kb]);
            self.spec
                .hash
                .pbkdf2(passphrase, &slot.salt, slot.iterations, &mut slot_key);
            let mut material = Zeroizing::new(vec![0u8; self.material_len()]);
            read(slot.key_offset as u64 * SECTOR as u64, &mut material)?;
            self.spec.cipher(&slot_key)?.decrypt(&mut material, 0);
            let candidate = afsplit::merge(self.spec.hash, &material, kb, STRIPES as usize);
            let mut digest = [0u8; DIGEST_LEN];
            self.spec.hash.pbkdf2(
                &candidate,
                &self.mk_digest_salt,
                self.mk_digest_iterations,
                &mut digest,
            );
            if digest == self.mk_digest {
                return Ok(candidate);
            }
        }
        Err(Error::new(
            ErrorKind::InvalidArgument,
            "Invalid password, cannot unlock any keyslot",
        ))
    }
}

impl LuksHeader {
    /// The slots `passphrase` unlocks (`read` as for [`unlock`](LuksHeader::unlock)).
    pub fn slots_opened_by(
        &self,
        passphrase: &[u8],
        read: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<Vec<usize>> {
        let mut out = Vec::new();
        for (i, slot) in self.slots.iter().enumerate().filter(|(_, s)| s.active) {
            let single = LuksHeader {
                slots: vec![slot.clone()],
                ..self.clone()
            };
            match single.unlock(passphrase, read) {
                Ok(_) => out.push(i),
                Err(e) if e.kind() == ErrorKind::InvalidArgument => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Fills slot `i` with `master` under `passphrase` (`iter_time_ms` of
    /// PBKDF2): sets its header entry and returns the key material to
    /// write at its `key_offset`.
    pub fn set_key(
        &mut self,
        i: usize,
        master: &[u8],
        passphrase: &[u8],
        iter_time_ms: u64,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let kb = self.key_bytes as usize;
        let rate = iterations_per_second(self.spec.hash, passphrase, kb);
        let iterations = iterations_for(rate, iter_time_ms, 1)?;
        let mut salt = [0u8; 32];
        random_bytes(&mut salt);
        let mut slot_key = Zeroizing::new(vec![0u8; kb]);
        self.spec
            .hash
            .pbkdf2(passphrase, &salt, iterations, &mut slot_key);
        let mut material = afsplit::split(self.spec.hash, master, STRIPES as usize, &mut |b| {
            random_bytes(b)
        });
        let whole = self.material_len();
        material.resize(whole, 0);
        self.spec.cipher(&slot_key)?.encrypt(&mut material, 0);
        let slot = &mut self.slots[i];
        slot.active = true;
        slot.iterations = iterations;
        slot.salt = salt;
        slot.stripes = STRIPES;
        Ok(material)
    }

    /// Marks slot `i` inactive (its material is to be overwritten next).
    pub fn erase_key(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        slot.active = false;
        slot.iterations = 0;
        slot.salt = [0u8; 32];
    }

    /// Bytes of one slot's stored material.
    pub fn slot_material_len(&self) -> usize {
        self.material_len()
    }
}

/// Fills `buf` with random bytes from the operating system.
pub fn random_bytes(buf: &mut [u8]) {
    // The kernel's generator does not fail once the system has booted;
    // a failure here would be a broken system, not bad input.
    getrandom::getrandom(buf).expect("the system's random number generator");
}

/// PBKDF2 iterations per second of `hash` for an output of `out_len`
/// bytes, measured on this machine (about 0.1 s).
fn iterations_per_second(hash: HashAlg, key: &[u8], out_len: usize) -> f64 {
    let mut n = 1000u32;
    let mut out = vec![0u8; out_len];
    loop {
        let t = std::time::Instant::now();
        hash.pbkdf2(key, &[0u8; 32], n, &mut out);
        let secs = t.elapsed().as_secs_f64();
        if secs > 0.1 || n >= 1 << 26 {
            return n as f64 / secs.max(1e-9);
        }
        n = n.saturating_mul(4);
    }
}

/// Iterations for `iter_time_ms` of PBKDF2 work, at least 1000.
fn iterations_for(rate: f64, iter_time_ms: u64, divide: u64) -> Result<u32> {
    let n = (rate * iter_time_ms as f64 / 1000.0 / divide as f64) as u64;
    let n = n.max(MIN_ITERATIONS);
    u32::try_from(n).map_err(|_| {
        Error::invalid_argument(format!("PBKDF iterations {n} larger than {}", u32::MAX))
    })
}

/// A new LUKS1 volume header with key slot 0 opened by `passphrase`:
/// the bytes of the whole key area (header and slot material, `payload
/// offset` sectors long) and the master key.
pub fn format(
    spec: CipherSpec,
    passphrase: &[u8],
    iter_time_ms: u64,
) -> Result<(Vec<u8>, LuksHeader, Zeroizing<Vec<u8>>)> {
    let kb = spec.key_bytes();
    let mut master = Zeroizing::new(vec![0u8; kb]);
    random_bytes(&mut master);
    let mut mk_salt = [0u8; 32];
    random_bytes(&mut mk_salt);
    let mk_rate = iterations_per_second(spec.hash, &master, DIGEST_LEN);
    let mk_iters = iterations_for(mk_rate, iter_time_ms, 8)?;
    let mut mk_digest = [0u8; DIGEST_LEN];
    spec.hash
        .pbkdf2(&master, &mk_salt, mk_iters, &mut mk_digest);
    let span = slot_sectors(kb as u64) as u32;
    let payload = HEADER_SECTORS + SLOTS as u32 * span;
    let mut slots: Vec<KeySlot> = (0..SLOTS)
        .map(|i| KeySlot {
            active: false,
            iterations: 0,
            salt: [0u8; 32],
            key_offset: HEADER_SECTORS + i as u32 * span,
            stripes: STRIPES,
        })
        .collect();
    let slot_rate = iterations_per_second(spec.hash, passphrase, kb);
    let slot_iters = iterations_for(slot_rate, iter_time_ms, 1)?;
    let mut salt = [0u8; 32];
    random_bytes(&mut salt);
    let mut slot_key = Zeroizing::new(vec![0u8; kb]);
    spec.hash
        .pbkdf2(passphrase, &salt, slot_iters, &mut slot_key);
    let mut material = afsplit::split(spec.hash, &master, STRIPES as usize, &mut |b| {
        random_bytes(b)
    });
    // Whole sectors (a 24-byte key's material is not); the padding is
    // part of the slot's area.
    let whole = material.len().next_multiple_of(SECTOR);
    material.resize(whole, 0);
    spec.cipher(&slot_key)?.encrypt(&mut material, 0);
    slots[0] = KeySlot {
        active: true,
        iterations: slot_iters,
        salt,
        key_offset: HEADER_SECTORS,
        stripes: STRIPES,
    };
    let header = LuksHeader {
        cipher_name: "aes".into(),
        cipher_mode: spec.mode_string(),
        hash_spec: spec.hash.name().into(),
        payload_offset: payload,
        key_bytes: kb as u32,
        mk_digest,
        mk_digest_salt: mk_salt,
        mk_digest_iterations: mk_iters,
        uuid: uuid::Uuid::new_v4().to_string(),
        slots,
        spec,
    };
    let mut area = vec![0u8; payload as usize * SECTOR];
    area[..HEADER_LEN].copy_from_slice(&header.to_bytes());
    let at = HEADER_SECTORS as usize * SECTOR;
    area[at..at + material.len()].copy_from_slice(&material);
    Ok((area, header, master))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unlock(area: &[u8], pass: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let h = LuksHeader::parse(area)?;
        h.unlock(pass, &mut |off, buf| {
            let off = off as usize;
            buf.copy_from_slice(&area[off..off + buf.len()]);
            Ok(())
        })
    }

    #[test]
    fn a_new_volume_unlocks_with_its_passphrase_only() {
        for spec in [
            CipherSpec::DEFAULT,
            CipherSpec {
                alg: CipherAlg::Aes128,
                mode: CipherMode::Cbc,
                ivgen: IvGen::Essiv(HashAlg::Sha256),
                hash: HashAlg::Sha1,
            },
            CipherSpec {
                alg: CipherAlg::Aes192,
                mode: CipherMode::Cbc,
                ivgen: IvGen::Plain,
                hash: HashAlg::Sha512,
            },
        ] {
            let (area, header, master) = format(spec, b"secret", 0).unwrap();
            assert_eq!(header.slots[0].iterations, 1000);
            assert_eq!(area.len(), header.payload_offset as usize * 512);
            let parsed = LuksHeader::parse(&area).unwrap();
            assert_eq!(parsed, header);
            assert_eq!(parsed.to_bytes(), area[..HEADER_LEN].to_vec());
            assert_eq!(&unlock(&area, b"secret").unwrap()[..], &master[..]);
            let e = unlock(&area, b"Secret").unwrap_err();
            assert!(e.to_string().contains("Invalid password"), "{e}");
        }
    }

    #[test]
    fn the_layout_is_the_one_qemu_writes() {
        let (_, h, _) = format(CipherSpec::DEFAULT, b"x", 0).unwrap();
        assert_eq!(h.cipher_mode, "xts-plain64");
        assert_eq!(h.hash_spec, "sha256");
        assert_eq!(h.key_bytes, 64);
        assert_eq!(h.payload_offset, 4040);
        let offsets: Vec<u32> = h.slots.iter().map(|s| s.key_offset).collect();
        assert_eq!(offsets, [8, 512, 1016, 1520, 2024, 2528, 3032, 3536]);
        assert_eq!(slot_sectors(32), 256);
        assert_eq!(slot_sectors(16), 128);
        assert_eq!(slot_sectors(48), 376);
    }

    #[test]
    fn hostile_headers_are_refused_with_qemus_messages() {
        let (area, _, _) = format(CipherSpec::DEFAULT, b"x", 0).unwrap();
        let cases: Vec<(usize, Vec<u8>, &str)> = vec![
            (0, b"LUKX".to_vec(), "not in LUKS format"),
            (6, vec![0, 2], "version 2"),
            (8, vec![b'a'; 32], "cipher name is not NUL terminated"),
            (104, 4u32.to_be_bytes().to_vec(), "payload is overlapping"),
            (164, 0u32.to_be_bytes().to_vec(), "iteration count is zero"),
            (208 + 44, 3999u32.to_be_bytes().to_vec(), "stripes 3999"),
            (
                208,
                7u32.to_be_bytes().to_vec(),
                "state (active/disable) is corrupted",
            ),
            (
                208 + 4,
                0u32.to_be_bytes().to_vec(),
                "Keyslot 0 iteration count is zero",
            ),
            (
                208 + 40,
                2u32.to_be_bytes().to_vec(),
                "overlapping with the LUKS header",
            ),
            (
                256 + 40,
                8u32.to_be_bytes().to_vec(),
                "Keyslots 0 and 1 are overlapping",
            ),
            (
                208 + 40,
                u32::MAX.to_be_bytes().to_vec(),
                "overlapping with the encrypted payload",
            ),
            (108, u32::MAX.to_be_bytes().to_vec(), "overlapping"),
            (
                40,
                b"xtsplain64\0".to_vec(),
                "Unexpected cipher mode string format",
            ),
            (
                40,
                b"gcm-plain64\0".to_vec(),
                "Cipher mode gcm not supported",
            ),
            (
                40,
                b"cbc-essiv\0\0\0\0\0".to_vec(),
                "Missing IV generator hash",
            ),
            (
                72,
                b"sha3\0".to_vec(),
                "Hash algorithm 'sha3' not supported",
            ),
            (8, b"twofish\0".to_vec(), "Algorithm twofish"),
        ];
        for (at, bytes, want) in cases {
            let mut b = area[..4096].to_vec();
            b[at..at + bytes.len()].copy_from_slice(&bytes);
            let e = LuksHeader::parse(&b).unwrap_err();
            assert!(e.to_string().contains(want), "{want}: {e}");
        }
    }
}
