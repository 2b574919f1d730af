//! qcow2 encryption: LUKS (crypt method 2; the LUKS1 header sits in the
//! image file where the full disk encryption header extension says, and
//! each sector's IV is its host offset / 512) and the legacy AES-CBC
//! method 1 (key: the password's first 16 bytes, IV: the guest sector).
//!
//! The driver maps encrypted data as [`Mapping::Encrypted`]; the generic
//! layer encrypts and decrypts through [`DataKey`].
//!
//! [`Mapping::Encrypted`]: crate::driver::Mapping::Encrypted

use super::header::{self, Header};
use crate::crypto::cipher::{CipherAlg, CipherMode, IvGen, SectorCipher};
use crate::crypto::hash::HashAlg;
use crate::crypto::luks::{self, CipherSpec, LuksHeader};
use crate::driver::{DataCipher, EncryptSpecific, LuksSlotInfo, LuksSpecific};
use crate::error::{Error, ErrorKind, Result};
use crate::secret::Secrets;
use crate::storage::Storage;
use std::collections::BTreeMap;
use zeroize::Zeroizing;

/// The option naming the secret that holds the passphrase.
pub const KEY_SECRET: &str = "encrypt.key-secret";

/// The key of an image's guest data.
pub(crate) struct DataKey {
    cipher: SectorCipher,
    /// LUKS: IVs from host offsets; legacy AES: from guest offsets.
    by_host: bool,
}

impl DataCipher for DataKey {
    fn encrypt(&self, buf: &mut [u8], host: u64, guest: u64) {
        let at = if self.by_host { host } else { guest };
        self.cipher.encrypt(buf, at / 512)
    }

    fn decrypt(&self, buf: &mut [u8], host: u64, guest: u64) {
        let at = if self.by_host { host } else { guest };
        self.cipher.decrypt(buf, at / 512)
    }
}

/// What an encrypted image's header says.
pub(crate) enum Scheme {
    /// Legacy AES-CBC.
    Aes,
    /// LUKS, with its header.
    Luks {
        header: Box<LuksHeader>,
        /// Where the LUKS area is in the image file, and its length.
        offset: u64,
        len: u64,
        /// The master key, when the image was unlocked (for `amend`).
        master: Option<Zeroizing<Vec<u8>>>,
    },
}

/// The encryption of an open image.
pub(crate) struct Encryption {
    pub(crate) scheme: Scheme,
    /// The data key; `None` when the image was opened without its secret
    /// (enough for `info`, `map`, `check`).
    pub(crate) key: Option<DataKey>,
}

/// The passphrase the open or create options name.
fn passphrase<'a>(
    options: &BTreeMap<String, String>,
    secrets: &'a Secrets,
) -> Result<Option<&'a [u8]>> {
    let Some(id) = options.get(KEY_SECRET) else {
        return Ok(None);
    };
    Ok(Some(secrets.get(id)?.as_utf8(id)?.as_bytes()))
}

/// The legacy AES key of a password: its first 16 bytes (up to a NUL),
/// zero-padded.
fn aes_key(password: &[u8]) -> Result<DataKey> {
    let len = password
        .iter()
        .position(|&c| c == 0)
        .unwrap_or(password.len())
        .min(16);
    let mut key = Zeroizing::new([0u8; 16]);
    key[..len].copy_from_slice(&password[..len]);
    Ok(DataKey {
        cipher: SectorCipher::new(CipherAlg::Aes128, CipherMode::Cbc, IvGen::Plain64, &key[..])?,
        by_host: false,
    })
}

/// Reads the LUKS area of `storage` at `offset` (`len` bytes long).
fn read_area(storage: &dyn Storage, offset: u64, len: u64, at: u64, buf: &mut [u8]) -> Result<()> {
    let end = at.checked_add(buf.len() as u64);
    if end.is_none_or(|e| e > len) || offset.checked_add(len).is_none() {
        return Err(Error::invalid_format(
            "LUKS header",
            offset,
            "Request for data outside of extension header",
        ));
    }
    storage.read_at(buf, offset + at).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::invalid_format(
                "LUKS header",
                offset + at,
                "the LUKS key area lies past the end of the file",
            )
        } else {
            Error::io("reading the LUKS header", e).at("LUKS header", offset + at)
        }
    })
}

impl Encryption {
    /// The encryption of an image with header `h`, unlocked when the
    /// options name a secret.
    pub(crate) fn open(
        storage: &dyn Storage,
        h: &Header,
        options: &BTreeMap<String, String>,
        secrets: &Secrets,
    ) -> Result<Option<Encryption>> {
        let pass = passphrase(options, secrets)?;
        match h.crypt_method {
            0 => {
                if pass.is_some() {
                    return Err(Error::invalid_argument(
                        "encrypt.key-secret given for an image that is not encrypted",
                    ));
                }
                Ok(None)
            }
            header::CRYPT_AES => Ok(Some(Encryption {
                scheme: Scheme::Aes,
                key: pass.map(aes_key).transpose()?,
            })),
            _ => {
                let (offset, len) = h.crypto_header().expect("checked when the header was read");
                let file_len = storage
                    .len()
                    .map_err(|e| Error::io("reading the image size", e))?;
                if offset.checked_add(len).is_none_or(|end| end > file_len) {
                    return Err(Error::invalid_format(
                        "LUKS header",
                        offset,
                        "the encryption header extension names a range past the end of the file",
                    ));
                }
                let mut b = vec![0u8; luks::HEADER_LEN];
                read_area(storage, offset, len, 0, &mut b)?;
                let header = LuksHeader::parse(&b).map_err(|e| e.at("LUKS header", offset))?;
                let (key, master) = match pass {
                    None => (None, None),
                    Some(p) => {
                        let master = header
                            .unlock(p, &mut |at, buf| read_area(storage, offset, len, at, buf))?;
                        let key = DataKey {
                            cipher: header.spec.cipher(&master)?,
                            by_host: true,
                        };
                        (Some(key), Some(master))
                    }
                };
                Ok(Some(Encryption {
                    scheme: Scheme::Luks {
                        header: Box::new(header),
                        offset,
                        len,
                        master,
                    },
                    key,
                }))
            }
        }
    }

    /// The key, or qemu's error when the image was opened without it.
    pub(crate) fn key(&self) -> Result<&DataKey> {
        self.key.as_ref().ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidArgument,
                "Parameter 'encrypt.key-secret' is required for cipher",
            )
        })
    }

    /// What `info` shows, with qemu-img's fields.
    pub(crate) fn specific(&self) -> EncryptSpecific {
        match &self.scheme {
            Scheme::Aes => EncryptSpecific::Aes {
                format: "aes".into(),
            },
            Scheme::Luks { header: h, .. } => {
                let spec = h.spec;
                EncryptSpecific::Luks(LuksSpecific {
                    ivgen_alg: spec.ivgen.name().into(),
                    detached_header: false,
                    hash_alg: spec.hash.name().into(),
                    cipher_alg: spec.alg.option_name().into(),
                    uuid: h.uuid.clone(),
                    ivgen_hash_alg: match spec.ivgen {
                        IvGen::Essiv(hash) => Some(hash.name().into()),
                        _ => None,
                    },
                    format: "luks".into(),
                    cipher_mode: spec.mode.name().into(),
                    slots: h
                        .slots
                        .iter()
                        .map(|s| LuksSlotInfo {
                            active: s.active,
                            iters: s.active.then_some(s.iterations as u64),
                            key_offset: s.key_offset as u64 * 512,
                            stripes: s.active.then_some(s.stripes),
                        })
                        .collect(),
                    payload_offset: h.payload_offset as u64 * 512,
                    master_key_iters: h.mk_digest_iterations as u64,
                })
            }
        }
    }
}

/// How `create` encrypts a new image.
pub(crate) enum CreateEncryption {
    /// Legacy AES: nothing stored but the method.
    Aes,
    /// LUKS with these ciphers, `iter_time_ms` of PBKDF2, and the
    /// passphrase.
    Luks {
        spec: CipherSpec,
        iter_time_ms: u64,
        passphrase: Zeroizing<Vec<u8>>,
    },
}

/// The LUKS-only options.
const LUKS_OPTIONS: [&str; 6] = [
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg",
    "encrypt.iter-time",
];

impl CreateEncryption {
    /// The encryption the create options ask for, with qemu-img's
    /// messages for what they get wrong.
    pub(crate) fn from_options(
        options: &BTreeMap<String, String>,
        secrets: &Secrets,
    ) -> Result<Option<CreateEncryption>> {
        let legacy = match options.get("encryption").map(String::as_str) {
            None | Some("off") | Some("false") => false,
            Some("on") | Some("true") => true,
            Some(v) => {
                return Err(Error::invalid_argument(format!(
                    "Parameter 'encryption' expects 'on' or 'off', not '{v}'"
                )))
            }
        };
        let format =
            match (options.get("encrypt.format"), legacy) {
                (Some(_), true) => return Err(Error::invalid_argument(
                    "'encrypt.format' and its alias 'encryption' can't be used at the same time",
                )),
                (Some(f), false) => Some(f.as_str()),
                (None, true) => Some("aes"),
                (None, false) => None,
            };
        let Some(format) = format else {
            if options.keys().any(|k| k.starts_with("encrypt.")) {
                return Err(Error::invalid_argument(
                    "Parameter 'encrypt.format' is missing",
                ));
            }
            return Ok(None);
        };
        let pass = passphrase(options, secrets)?;
        match format {
            "aes" => {
                if let Some(k) = LUKS_OPTIONS.iter().find(|k| options.contains_key(**k)) {
                    return Err(Error::invalid_argument(format!(
                        "Parameter '{k}' is unexpected"
                    )));
                }
                if pass.is_none() {
                    return Err(missing_secret());
                }
                Ok(Some(CreateEncryption::Aes))
            }
            "luks" => {
                let get = |k: &str| options.get(k).map(String::as_str);
                let alg = match get("encrypt.cipher-alg") {
                    None => CipherAlg::Aes256,
                    Some(a) => CipherAlg::from_option(a).ok_or_else(|| {
                        Error::new(
                            ErrorKind::Unsupported,
                            format!("Parameter 'cipher-alg' does not accept value '{a}' (imgloop has aes-128, aes-192, aes-256)"),
                        )
                    })?,
                };
                let mode = match get("encrypt.cipher-mode") {
                    None => CipherMode::Xts,
                    Some(m) => CipherMode::from_name(m).ok_or_else(|| {
                        Error::invalid_argument(format!(
                            "Parameter 'cipher-mode' does not accept value '{m}'"
                        ))
                    })?,
                };
                let hash_opt = |k: &str, default: HashAlg| -> Result<HashAlg> {
                    match get(k) {
                        None => Ok(default),
                        Some(h) => HashAlg::from_name(h).ok_or_else(|| {
                            Error::invalid_argument(format!(
                                "Parameter '{}' does not accept value '{h}'",
                                k.trim_start_matches("encrypt.")
                            ))
                        }),
                    }
                };
                let ivgen = match get("encrypt.ivgen-alg") {
                    None | Some("plain64") => IvGen::Plain64,
                    Some("plain") => IvGen::Plain,
                    Some("essiv") => {
                        IvGen::Essiv(hash_opt("encrypt.ivgen-hash-alg", HashAlg::Sha256)?)
                    }
                    Some(g) => {
                        return Err(Error::invalid_argument(format!(
                            "Parameter 'ivgen-alg' does not accept value '{g}'"
                        )))
                    }
                };
                let hash = hash_opt("encrypt.hash-alg", HashAlg::Sha256)?;
                let iter_time_ms = match get("encrypt.iter-time") {
                    None => 2000,
                    Some(t) => t.parse::<u64>().map_err(|_| {
                        Error::invalid_argument(format!(
                            "Parameter 'iter-time' expects a number of milliseconds, not '{t}'"
                        ))
                    })?,
                };
                let spec = CipherSpec {
                    alg,
                    mode,
                    ivgen,
                    hash,
                };
                // The key must work (essiv needs an AES-sized digest).
                spec.cipher(&vec![0u8; spec.key_bytes()])?;
                let Some(pass) = pass else {
                    return Err(missing_secret());
                };
                Ok(Some(CreateEncryption::Luks {
                    spec,
                    iter_time_ms,
                    passphrase: Zeroizing::new(pass.to_vec()),
                }))
            }
            other => Err(Error::invalid_argument(format!(
                "Parameter 'format' does not accept value '{other}'"
            ))),
        }
    }

    /// `crypt_method` of the header.
    pub(crate) fn method(&self) -> u32 {
        match self {
            CreateEncryption::Aes => header::CRYPT_AES,
            CreateEncryption::Luks { .. } => header::CRYPT_LUKS,
        }
    }

    /// Bytes of the LUKS area (0 for legacy AES).
    pub(crate) fn area_len(&self) -> u64 {
        match self {
            CreateEncryption::Aes => 0,
            CreateEncryption::Luks { spec, .. } => {
                let kb = spec.key_bytes() as u64;
                (8 + luks::SLOTS as u64 * luks::slot_sectors(kb)) * 512
            }
        }
    }

    /// The LUKS area's bytes: a new header and key slot 0.
    pub(crate) fn format_area(&self) -> Result<Vec<u8>> {
        match self {
            CreateEncryption::Aes => Ok(Vec::new()),
            CreateEncryption::Luks {
                spec,
                iter_time_ms,
                passphrase,
            } => Ok(luks::format(*spec, passphrase, *iter_time_ms)?.0),
        }
    }
}

fn missing_secret() -> Error {
    Error::invalid_argument("Parameter 'encrypt.key-secret' is required for cipher")
}

/// The `amend` options of LUKS key slots.
pub(crate) const AMEND_OPTIONS: [&str; 5] = [
    "encrypt.state",
    "encrypt.keyslot",
    "encrypt.new-secret",
    "encrypt.old-secret",
    "encrypt.iter-time",
];

impl Encryption {
    /// `amend -o encrypt.state=active|inactive,...`: adds or erases LUKS key
    /// slots with qemu's rules and messages. The header is rewritten after
    /// new key material is durable; erased material is overwritten after
    /// the header no longer names it.
    pub(crate) fn amend_keyslots(
        &self,
        storage: &dyn Storage,
        options: &BTreeMap<String, String>,
        secrets: &Secrets,
        force: bool,
    ) -> Result<()> {
        let Scheme::Luks {
            header,
            offset,
            len,
            master,
        } = &self.scheme
        else {
            return Err(Error::unsupported(
                "Only LUKS encryption options can be amended",
            ));
        };
        let (offset, len) = (*offset, *len);
        let master = master.as_ref().ok_or_else(missing_secret)?;
        let get = |k: &str| options.get(k).map(String::as_str);
        let keyslot = match get("encrypt.keyslot") {
            None => None,
            Some(v) => {
                let n: i64 = v.parse().map_err(|_| {
                    Error::invalid_argument(format!(
                        "Parameter 'keyslot' expects a number, not '{v}'"
                    ))
                })?;
                if !(0..luks::SLOTS as i64).contains(&n) {
                    return Err(Error::invalid_argument(format!(
                        "Invalid keyslot {n} specified, must be between 0 and {}",
                        luks::SLOTS - 1
                    )));
                }
                Some(n as usize)
            }
        };
        let secret = |k: &str| -> Result<Option<Zeroizing<Vec<u8>>>> {
            match get(k) {
                None => Ok(None),
                Some(id) => Ok(Some(Zeroizing::new(
                    secrets.get(id)?.as_utf8(id)?.as_bytes().to_vec(),
                ))),
            }
        };
        // The header as it is on disk now (an earlier amend through this
        // handle may have changed it).
        let _ = header;
        let mut fresh = vec![0u8; luks::HEADER_LEN];
        read_area(storage, offset, len, 0, &mut fresh)?;
        let mut h = LuksHeader::parse(&fresh)?;
        let sync = || {
            storage
                .sync()
                .map_err(|e| Error::io("syncing the image file", e))
        };
        let write_header = |h: &LuksHeader| -> Result<()> {
            storage
                .write_at(&h.to_bytes(), offset)
                .map_err(|e| Error::io("writing the LUKS header", e).at("LUKS header", offset))?;
            sync()
        };
        match get("encrypt.state") {
            Some("active") => {
                if get("encrypt.old-secret").is_some() {
                    return Err(Error::invalid_argument(
                        "'old-secret' must not be given when activating keyslots",
                    ));
                }
                let Some(new) = secret("encrypt.new-secret")? else {
                    return Err(Error::invalid_argument(
                        "'new-secret' is required to activate a keyslot",
                    ));
                };
                let slot = match keyslot {
                    Some(i) => {
                        if h.slots[i].active && !force {
                            return Err(Error::invalid_argument(format!(
                                "Refusing to overwrite active keyslot {i} - please erase it first"
                            )));
                        }
                        i
                    }
                    None => h.slots.iter().position(|s| !s.active).ok_or_else(|| {
                        Error::invalid_argument("Can't add a keyslot - all keyslots are in use")
                    })?,
                };
                let iter_time = match get("encrypt.iter-time") {
                    None => 2000,
                    Some(t) => t.parse().map_err(|_| {
                        Error::invalid_argument(format!(
                            "Parameter 'iter-time' expects a number, not '{t}'"
                        ))
                    })?,
                };
                let material = h.set_key(slot, master, &new, iter_time)?;
                let at = h.slots[slot].key_offset as u64 * 512;
                if at + material.len() as u64 > len {
                    return Err(Error::invalid_format(
                        "LUKS header",
                        offset,
                        "Request for data outside of extension header",
                    ));
                }
                storage
                    .write_at(&material, offset + at)
                    .map_err(|e| Error::io("writing LUKS key material", e))?;
                sync()?;
                write_header(&h)
            }
            Some("inactive") => {
                for (k, what) in [
                    (
                        "encrypt.new-secret",
                        "'new-secret' must not be given when erasing keyslots",
                    ),
                    (
                        "encrypt.iter-time",
                        "'iter-time' must not be given when erasing keyslots",
                    ),
                ] {
                    if get(k).is_some() {
                        return Err(Error::invalid_argument(what));
                    }
                }
                let old = secret("encrypt.old-secret")?;
                let read = &mut |at: u64, buf: &mut [u8]| read_area(storage, offset, len, at, buf);
                let victims: Vec<usize> = match (keyslot, &old) {
                    (Some(i), old) => {
                        if !h.slots[i].active {
                            return Err(Error::invalid_argument(format!(
                                "Given keyslot {i} is already erased (inactive) "
                            )));
                        }
                        if let Some(p) = old {
                            if !h.slots_opened_by(p, read)?.contains(&i) {
                                return Err(Error::invalid_argument(format!(
                                    "Given keyslot {i} doesn't contain the given old password for erase operation"
                                )));
                            }
                        }
                        vec![i]
                    }
                    (None, Some(p)) => {
                        let v = h.slots_opened_by(p, read)?;
                        if v.is_empty() {
                            return Err(Error::invalid_argument(
                                "No keyslots match given (old) password for erase operation",
                            ));
                        }
                        v
                    }
                    (None, None) => {
                        return Err(Error::invalid_argument(
                            "To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given",
                        ))
                    }
                };
                let active = h.slots.iter().filter(|s| s.active).count();
                if victims.len() == active && !force {
                    return Err(Error::invalid_argument(if keyslot.is_some() {
                        format!(
                            "Attempt to erase the only active keyslot {} which will erase all the data in the image irreversibly - refusing operation",
                            victims[0]
                        )
                    } else {
                        "All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation".to_string()
                    }));
                }
                for &i in &victims {
                    h.erase_key(i);
                }
                write_header(&h)?;
                // The material goes too: overwritten with random bytes, as
                // often as qemu does.
                let mut noise = vec![0u8; h.slot_material_len()];
                for &i in &victims {
                    let at = offset + h.slots[i].key_offset as u64 * 512;
                    for _ in 0..40 {
                        luks::random_bytes(&mut noise);
                        storage
                            .write_at(&noise, at)
                            .map_err(|e| Error::io("erasing LUKS key material", e))?;
                    }
                }
                sync()
            }
            Some(other) => Err(Error::invalid_argument(format!(
                "Parameter 'state' does not accept value '{other}'"
            ))),
            None => Err(Error::invalid_argument(
                "Parameter 'encrypt.state' is missing",
            )),
        }
    }
}
