//! GUIDs as VHDX stores them: 16 bytes in Microsoft's mixed-endian layout
//! (the first three fields little-endian, the last eight bytes as they
//! are), shown as `{XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX}`.

use std::fmt;

/// One GUID, as its 16 on-disk bytes.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// The all-zero GUID ("no log", "no value").
    pub const ZERO: Guid = Guid([0; 16]);

    /// A GUID from its textual fields (as in the specification's tables).
    pub const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ])
    }

    /// A new random (version 4) GUID.
    pub fn random() -> Guid {
        Guid(uuid::Uuid::new_v4().to_bytes_le())
    }

    /// The GUID at `b[at..at + 16]`.
    pub fn read(b: &[u8], at: usize) -> Guid {
        Guid(b[at..at + 16].try_into().expect("16 bytes"))
    }

    /// True for the all-zero GUID.
    pub fn is_zero(&self) -> bool {
        *self == Guid::ZERO
    }

    /// Parses `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}` (braces optional,
    /// either case), as parent locators store linkage GUIDs.
    pub fn parse(text: &str) -> Option<Guid> {
        let t = text.trim();
        let t = t
            .strip_prefix('{')
            .and_then(|t| t.strip_suffix('}'))
            .unwrap_or(t);
        uuid::Uuid::parse_str(t).ok().map(|u| Guid(u.to_bytes_le()))
    }
}

impl fmt::Display for Guid {
    /// Lower case with braces, as parent locators store it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{{}}}", uuid::Uuid::from_bytes_le(self.0).hyphenated())
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bat_region_guid_has_its_documented_bytes_and_text() {
        let bat = Guid::from_fields(
            0x2DC2_7766,
            0xF623,
            0x4200,
            [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
        );
        assert_eq!(
            bat.0,
            [
                0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd,
                0x4a, 0x08
            ]
        );
        assert_eq!(bat.to_string(), "{2dc27766-f623-4200-9d64-115e9bfd4a08}");
        assert_eq!(
            Guid::parse("{2DC27766-F623-4200-9D64-115E9BFD4A08}"),
            Some(bat)
        );
        assert_eq!(
            Guid::parse("2dc27766-f623-4200-9d64-115e9bfd4a08"),
            Some(bat)
        );
        assert!(Guid::parse("{nope}").is_none());
        assert_ne!(Guid::random(), Guid::random());
    }
}
