//! `--object` and `--image-opts`, as qemu-img takes them.
//!
//! - `--object secret,id=ID,data=TEXT` or `--object secret,id=ID,file=PATH`
//!   (optionally `format=base64`) defines a secret that image options
//!   name: `encrypt.key-secret=ID`. Secret values are never printed.
//! - `--image-opts` makes each image argument a list of options,
//!   `driver=qcow,file.filename=PATH,encrypt.key-secret=ID`, instead of a
//!   file name.

use base64::Engine;
use imgloop::{Error, Result, Secret, Secrets};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The flags every image-opening subcommand shares.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ObjectArgs {
    /// Define an object: `secret,id=ID,data=TEXT` or
    /// `secret,id=ID,file=PATH` (add `format=base64` for base64 data); image
    /// options name it with `encrypt.key-secret=ID`.
    #[arg(long = "object", value_name = "OBJECTDEF")]
    pub objects: Vec<String>,
    /// Take each image argument as image options
    /// (`driver=FMT,file.filename=PATH,KEY=VALUE,...`) instead of a file name.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
}

/// What an image argument names: the file, the format (if given) and the
/// driver options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSpec {
    pub path: PathBuf,
    pub format: Option<String>,
    pub options: BTreeMap<String, String>,
}

/// Splits `key=value,key=value` (`,,` is a literal comma; a bare word is
/// `word=on`). Values are not echoed in errors: they may be secrets.
fn split_options(text: &str) -> Result<Vec<(String, String)>> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    let mut out = Vec::new();
    for item in items.into_iter().filter(|s| !s.is_empty()) {
        let (k, v) = match item.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (item, "on".to_string()),
        };
        if k.is_empty() {
            return Err(Error::invalid_argument("an option has an empty name"));
        }
        out.push((k, v));
    }
    Ok(out)
}

/// An object's `key=value` fields, in order.
type Fields = Vec<(String, String)>;

/// TLS credentials an `--object tls-creds-x509,...` or `--object
/// tls-creds-psk,...` defines.
pub struct TlsObject {
    /// `dir`: where the PEM files, or `keys.psk`, are.
    pub dir: std::path::PathBuf,
    /// `verify-peer` (x509; default on, as in qemu): clients must present
    /// a certificate signed by the directory's CA.
    pub verify_peer: bool,
    /// Pre-shared keys (`tls-creds-psk`) rather than certificates.
    pub psk: bool,
}

impl ObjectArgs {
    /// Each `--object` as (type, the other fields); the type is the first
    /// word or `qom-type=`.
    fn typed_objects(&self) -> Result<Vec<(String, Fields)>> {
        let mut out = Vec::new();
        for def in &self.objects {
            let mut fields = split_options(def)?;
            if fields.is_empty() {
                continue;
            }
            let (kind, on) = fields.remove(0);
            let kind = if on == "on" { kind } else { on };
            out.push((kind, fields));
        }
        Ok(out)
    }

    /// The `tls-creds-x509` or `tls-creds-psk` object with this `id`, if
    /// any.
    pub fn tls_creds(&self, want: &str) -> Result<Option<TlsObject>> {
        for (kind, fields) in self.typed_objects()? {
            if !matches!(kind.as_str(), "tls-creds-x509" | "tls-creds-psk") {
                continue;
            }
            let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            if get("id").as_deref() != Some(want) {
                continue;
            }
            let psk = kind == "tls-creds-psk";
            for (k, _) in &fields {
                let known = match k.as_str() {
                    "id" | "dir" | "endpoint" | "priority" => true,
                    "verify-peer" | "sanity-check" => !psk,
                    "username" => psk,
                    _ => false,
                };
                if !known {
                    return Err(Error::invalid_argument(format!(
                        "Property '{kind}.{k}' not found"
                    )));
                }
            }
            if get("endpoint").is_some_and(|e| e != "server") {
                return Err(Error::invalid_argument(format!(
                    "Expecting TLS credentials with a server endpoint ('{want}')"
                )));
            }
            let dir = get("dir").ok_or_else(|| {
                Error::invalid_argument(format!("{kind} '{want}': 'dir' is missing"))
            })?;
            let verify_peer = match get("verify-peer").as_deref() {
                None | Some("on" | "yes" | "true") => true,
                Some("off" | "no" | "false") => false,
                Some(v) => {
                    return Err(Error::invalid_argument(format!(
                        "Parameter 'verify-peer' expects 'on' or 'off', not '{v}'"
                    )))
                }
            };
            return Ok(Some(TlsObject {
                dir: dir.into(),
                verify_peer,
                psk,
            }));
        }
        Ok(None)
    }

    /// The identity of the `authz-simple` object with this `id`.
    pub fn authz_identity(&self, want: &str) -> Result<String> {
        for (kind, fields) in self.typed_objects()? {
            if !kind.starts_with("authz-") {
                continue;
            }
            let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            if get("id").as_deref() != Some(want) {
                continue;
            }
            if kind != "authz-simple" {
                return Err(Error::unsupported(format!(
                    "authorization objects of type {kind} are not supported (authz-simple is)"
                )));
            }
            return get("identity").ok_or_else(|| {
                Error::invalid_argument(format!("authz-simple '{want}': 'identity' is missing"))
            });
        }
        Err(Error::invalid_argument(format!(
            "No authorization object with id '{want}'"
        )))
    }

    /// The secrets the `--object` flags define.
    pub fn secrets(&self) -> Result<Secrets> {
        let mut secrets = Secrets::new();
        for def in &self.objects {
            let mut fields = split_options(def)?;
            if fields.is_empty() {
                return Err(Error::invalid_argument("--object needs a type (secret)"));
            }
            let (kind, on) = fields.remove(0);
            let kind = if on == "on" {
                kind
            } else if kind == "qom-type" {
                on
            } else {
                return Err(Error::invalid_argument(
                    "--object must start with its type (secret)",
                ));
            };
            if matches!(
                kind.as_str(),
                "tls-creds-x509" | "tls-creds-psk" | "authz-simple"
            ) {
                // Read by `tls_creds` and `authz_identity` (serve).
                continue;
            }
            if kind != "secret" {
                return Err(Error::invalid_argument(format!(
                    "invalid object type: {kind} (imgloop knows 'secret' and 'tls-creds-x509')"
                )));
            }
            let (mut id, mut data, mut file, mut format) = (None, None, None, None);
            for (k, v) in fields {
                match k.as_str() {
                    "id" => id = Some(v),
                    "data" => data = Some(v),
                    "file" => file = Some(v),
                    "format" => format = Some(v),
                    "keyid" | "iv" => {
                        return Err(Error::unsupported(
                            "secrets encrypted with another secret (keyid, iv) are not supported",
                        ))
                    }
                    other => {
                        return Err(Error::invalid_argument(format!(
                            "Property 'secret.{other}' not found"
                        )))
                    }
                }
            }
            let id = id.ok_or_else(|| Error::invalid_argument("Parameter 'id' is missing"))?;
            let raw = match (data, file) {
                (Some(d), None) => d.into_bytes(),
                (None, Some(f)) => std::fs::read(&f).map_err(|e| {
                    Error::io(format!("Unable to read {f} for the secret '{id}'"), e)
                })?,
                (Some(_), Some(_)) => {
                    return Err(Error::invalid_argument(format!(
                        "secret '{id}': 'data' and 'file' are mutually exclusive"
                    )))
                }
                (None, None) => {
                    return Err(Error::invalid_argument(format!(
                        "secret '{id}': either 'file' or 'data' must be provided"
                    )))
                }
            };
            let bytes = match format.as_deref() {
                None | Some("raw") => raw,
                Some("base64") => base64::engine::general_purpose::STANDARD
                    .decode(&raw)
                    .map_err(|_| {
                        Error::invalid_argument(format!(
                            "secret '{id}': the data is not valid base64"
                        ))
                    })?,
                Some(other) => {
                    return Err(Error::invalid_argument(format!(
                        "secret '{id}': invalid format '{other}' (raw or base64)"
                    )))
                }
            };
            secrets.insert(id, Secret::new(bytes));
        }
        Ok(secrets)
    }

    /// What the image argument `arg` names; `format` is the `-f` value.
    pub fn spec(&self, arg: &std::path::Path, format: Option<&str>) -> Result<ImageSpec> {
        if !self.image_opts {
            return Ok(ImageSpec {
                path: arg.to_path_buf(),
                format: format.map(str::to_string),
                options: BTreeMap::new(),
            });
        }
        if format.is_some() {
            return Err(Error::invalid_argument(
                "--image-opts and --format are mutually exclusive",
            ));
        }
        let text = arg
            .to_str()
            .ok_or_else(|| Error::invalid_argument("image options must be valid UTF-8"))?;
        let mut spec = ImageSpec {
            path: PathBuf::new(),
            format: None,
            options: BTreeMap::new(),
        };
        let mut named = false;
        for (k, v) in split_options(text)? {
            match k.as_str() {
                "driver" => spec.format = Some(v),
                "file.filename" | "filename" | "file" => {
                    spec.path = PathBuf::from(v);
                    named = true;
                }
                // The protocol layer is always a host file or device.
                "file.driver" if matches!(v.as_str(), "file" | "host_device") => {}
                "file.driver" => {
                    return Err(Error::unsupported(format!(
                        "protocol driver '{v}' (imgloop opens host files and devices)"
                    )))
                }
                _ => {
                    spec.options.insert(k, v);
                }
            }
        }
        if !named {
            return Err(Error::invalid_argument(
                "image options need the file name (file.filename=PATH)",
            ));
        }
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(objects: &[&str], image_opts: bool) -> ObjectArgs {
        ObjectArgs {
            objects: objects.iter().map(|s| s.to_string()).collect(),
            image_opts,
        }
    }

    #[test]
    fn secrets_come_from_data_files_and_base64() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, b"from-file").unwrap();
        let a = args(
            &[
                "secret,id=a,data=x,,y",
                &format!("secret,id=b,file={}", f.display()),
                "secret,id=c,data=aGVsbG8=,format=base64",
            ],
            false,
        );
        let s = a.secrets().unwrap();
        assert_eq!(s.get("a").unwrap().expose(), b"x,y");
        assert_eq!(s.get("b").unwrap().expose(), b"from-file");
        assert_eq!(s.get("c").unwrap().expose(), b"hello");
    }

    #[test]
    fn bad_objects_are_errors_that_never_show_the_secret() {
        for def in [
            "secret,data=hunter2",
            "secret,id=a,data=hunter2,file=/x",
            "secret,id=a,data=hunter2,format=hex",
            "secret,id=a,data=hunter2,colour=red",
            "thing,id=a,data=hunter2",
            "secret,id=a,=hunter2",
        ] {
            let e = args(&[def], false).secrets().unwrap_err().to_string();
            assert!(!e.contains("hunter2"), "{def}: {e}");
        }
    }

    #[test]
    fn image_options_name_the_driver_file_and_driver_options() {
        let a = args(&[], true);
        let s = a
            .spec(
                std::path::Path::new(
                    "driver=qcow,file.filename=/tmp/a,,b.qcow,encrypt.key-secret=sec0",
                ),
                None,
            )
            .unwrap();
        assert_eq!(s.format.as_deref(), Some("qcow"));
        assert_eq!(s.path, PathBuf::from("/tmp/a,b.qcow"));
        assert_eq!(s.options["encrypt.key-secret"], "sec0");
        assert!(a.spec(std::path::Path::new("driver=qcow"), None).is_err());
        assert!(a
            .spec(std::path::Path::new("file.filename=x"), Some("raw"))
            .is_err());
        let plain = args(&[], false)
            .spec(std::path::Path::new("x,y"), Some("raw"))
            .unwrap();
        assert_eq!(plain.path, PathBuf::from("x,y"));
    }
}
