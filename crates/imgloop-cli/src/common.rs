//! Helpers shared by the subcommands.

use imgloop::{Condition, Error, Image, OpenOptions, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// `--output` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Output {
    /// Text for people.
    #[default]
    Human,
    /// JSON with qemu-img's field names.
    Json,
}

/// Checks a qemu-img cache mode name: `-T` (`source`) or `-t`.
pub fn check_cache_mode(mode: &str, source: bool) -> Result<()> {
    match mode {
        "none" | "writeback" | "writethrough" | "directsync" | "unsafe" => Ok(()),
        other => Err(Error::invalid_argument(format!(
            "Invalid {}cache option: {other}",
            if source { "source " } else { "" }
        ))),
    }
}

/// Prints an error as one line on stderr and returns exit code 1.
pub fn fail(err: &Error) -> u8 {
    report(err);
    1
}

/// Prints an error as one line on stderr, with the advice a user of
/// the command line needs for the conditions the library reports.
pub fn report(err: &Error) {
    match err.condition() {
        Some(Condition::MarkedCorrupt) => eprintln!(
            "imgloop: {err}; repair it with 'imgloop check -r all' (or open it read-only)"
        ),
        Some(Condition::ProbedRawHeader) => {
            eprintln!("imgloop: {err}; open the image with -f raw to allow it")
        }
        // qemu-img's own words.
        Some(Condition::ShrinkNotAllowed) => {
            eprintln!("imgloop: Use the --shrink option to perform a shrink operation.")
        }
        _ => eprintln!("imgloop: {err}"),
    }
}

/// The driver options for `-l SNAPSHOT` (convert, attach, fuse), as
/// qemu-img reads it: `snapshot.id=ID,snapshot.name=NAME` (either or
/// both), or an ID or name alone.
pub fn snapshot_options(param: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    if param.starts_with("snapshot.") {
        for (k, v) in parse_options(&[param.to_string()])? {
            match k.as_str() {
                "snapshot.id" | "snapshot.name" => {
                    out.insert(k, v);
                }
                _ => {
                    return Err(Error::invalid_argument(format!(
                        "Invalid parameter '{k}' (-l takes snapshot.id and snapshot.name)"
                    )))
                }
            }
        }
    } else {
        out.insert("snapshot".to_string(), param.to_string());
    }
    Ok(out)
}

/// Opens an image for an export (attach, fuse): the image argument `arg`
/// (a file, or image options with `--image-opts`), with the secrets
/// `--object` defines, showing the internal snapshot `snapshot`
/// (read-only) when one is named.
pub fn open_export(
    arg: &Path,
    format: Option<&str>,
    read_only: bool,
    snapshot: Option<&str>,
    objects: &crate::objects::ObjectArgs,
) -> Result<Image> {
    let mut spec = objects.spec(arg, format)?;
    if let Some(s) = snapshot {
        spec.options.extend(snapshot_options(s)?);
    }
    let opts = OpenOptions {
        format: spec.format,
        read_only: read_only || snapshot.is_some(),
        driver_options: spec.options,
        secrets: objects.secrets()?,
        policy: imgloop::FilePolicy::like_qemu_img(),
        ..Default::default()
    };
    open_with(&spec.path, &opts)
}

/// Opens the image an argument names (a file, or image options with
/// `--image-opts`), with the secrets `--object` defines.
pub fn open_image(
    arg: &Path,
    format: Option<&str>,
    read_only: bool,
    force_share: bool,
    objects: &crate::objects::ObjectArgs,
) -> Result<Image> {
    open_image_with(
        arg,
        format,
        (read_only, force_share),
        objects,
        imgloop::FilePolicy::like_qemu_img(),
    )
}

/// [`open_image`] with an open policy; `mode` is (read-only, force-share).
pub fn open_image_with(
    arg: &Path,
    format: Option<&str>,
    mode: (bool, bool),
    objects: &crate::objects::ObjectArgs,
    policy: imgloop::FilePolicy,
) -> Result<Image> {
    let (read_only, force_share) = mode;
    let spec = objects.spec(arg, format)?;
    let opts = OpenOptions {
        format: spec.format,
        read_only,
        force_share,
        driver_options: spec.options,
        secrets: objects.secrets()?,
        policy,
        ..Default::default()
    };
    open_with(&spec.path, &opts)
}

/// Opens an image with `opts` and prints what its drivers warn about
/// (e.g. a backing file changed since a COW file was made over it).
pub fn open_with(path: &Path, opts: &OpenOptions) -> Result<Image> {
    let img = Image::open(path, opts)?;
    for layer in img.chain() {
        for w in layer.driver().warnings() {
            eprintln!("imgloop: warning: {}: {w}", layer.name());
        }
    }
    Ok(img)
}

/// Prints `value` as JSON indented by four spaces, like qemu-img.
pub fn print_json<T: Serialize>(value: &T) {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    value
        .serialize(&mut ser)
        .expect("serializing plain data cannot fail");
    out.push(b'\n');
    let _ = std::io::stdout().write_all(&out);
}

/// Parses `-o` arguments (`key=value,key=value`, repeatable; a bare `key`
/// means `key=on`). `,,` stands for a literal comma, as in qemu-img.
pub fn parse_options(list: &[String]) -> Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for arg in list {
        let mut items = Vec::new();
        let mut cur = String::new();
        let mut chars = arg.chars().peekable();
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
        for item in items.into_iter().filter(|s| !s.is_empty()) {
            let (k, v) = match item.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (item.clone(), "on".to_string()),
            };
            if k.is_empty() {
                return Err(Error::invalid_argument(format!("invalid option '{item}'")));
            }
            map.insert(k, v);
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_on_single_commas_and_keep_doubled_ones() {
        let m = parse_options(&["a=1,b=x,,y".into(), "flag".into()]).unwrap();
        assert_eq!(m["a"], "1");
        assert_eq!(m["b"], "x,y");
        assert_eq!(m["flag"], "on");
        assert!(parse_options(&["=5".into()]).is_err());
    }
}
