//! The list of formats imgloop knows, lookup by name, and probing.

use crate::driver::Format;
use crate::error::{Error, ErrorKind, Result};
use crate::formats::cow::CowFormat;
use crate::formats::parallels::ParallelsFormat;
use crate::formats::qcow::QcowFormat;
use crate::formats::qcow2::Qcow2Format;
use crate::formats::raw::RawFormat;
use crate::formats::vhdx::VhdxFormat;
use std::path::Path;

static RAW: RawFormat = RawFormat;
static QCOW2: Qcow2Format = Qcow2Format;
static COW: CowFormat = CowFormat;
static QCOW: QcowFormat = QcowFormat;
static VHDX: VhdxFormat = VhdxFormat;
static PARALLELS: ParallelsFormat = ParallelsFormat;

/// Every format driver imgloop has, in probing order.
pub fn formats() -> &'static [&'static dyn Format] {
    static ALL: [&dyn Format; 6] = [&QCOW2, &QCOW, &VHDX, &PARALLELS, &COW, &RAW];
    &ALL
}

/// Format names the project plans to support but that have no driver yet.
const PLANNED: &[&str] = &["vpc", "vmdk", "vdi"];

/// The format called `name` (as qemu-img spells it).
pub fn find(name: &str) -> Result<&'static dyn Format> {
    if let Some(f) = formats().iter().find(|f| f.name() == name) {
        return Ok(*f);
    }
    if PLANNED.contains(&name) {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("format '{name}' is not supported by this version of imgloop yet"),
        ));
    }
    Err(Error::new(
        ErrorKind::NotFound,
        format!("Unknown driver '{name}'"),
    ))
}

/// Picks the format whose probe scores `header` (the file's first bytes)
/// highest. `raw` always scores 1, so probing always finds a format.
pub fn probe(header: &[u8], filename: &Path) -> &'static dyn Format {
    let mut best: &'static dyn Format = &RAW;
    let mut best_score = 0;
    for f in formats() {
        let score = f.probe(header, filename);
        if score > best_score {
            best = *f;
            best_score = score;
        }
    }
    best
}

/// The first format other than raw that claims `header`, if any: used to
/// keep a probed raw image from having a format header written to sector 0.
pub fn probe_non_raw(header: &[u8]) -> Option<&'static str> {
    formats()
        .iter()
        .filter(|f| f.name() != "raw")
        .find(|f| f.probe(header, Path::new("")) > 0)
        .map(|f| f.name())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_names_and_planned_names_give_different_errors() {
        assert_eq!(find("raw").unwrap().name(), "raw");
        let e = find("foo").err().unwrap();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.to_string().contains("Unknown driver 'foo'"));
        assert_eq!(find("vdi").err().unwrap().kind(), ErrorKind::Unsupported);
    }

    #[test]
    fn anything_probes_as_raw_when_no_format_claims_it() {
        assert_eq!(probe(b"hello", Path::new("x.img")).name(), "raw");
        assert_eq!(probe_non_raw(&[0u8; 512]), None);
    }
}
