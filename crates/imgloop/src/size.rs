//! Sizes as qemu-img writes them: `1024`, `64k`, `1.5G`, `2T`.

use crate::error::{Error, Result};

/// Parses a size with an optional binary suffix (`b`, `k`/`K`, `M`, `G`,
/// `T`, `P`, `E`; case-insensitive, 1024-based) and an optional fraction
/// (`1.5G`). A bare number is bytes.
pub fn parse_size(text: &str) -> Result<u64> {
    let bad = || Error::invalid_argument(format!("Invalid image size specified: '{text}'"));
    let t = text.trim();
    if t.is_empty() {
        return Err(bad());
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return Err(bad()),
    };
    if num.is_empty() || num.starts_with('.') {
        return Err(bad());
    }
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if frac.contains('.') || (shift == 0 && !frac.is_empty()) {
        return Err(bad());
    }
    let int: u64 = int.parse().map_err(|_| bad())?;
    let whole = int.checked_mul(1u64 << shift).ok_or_else(bad)?;
    let mut part = 0u64;
    if !frac.is_empty() {
        // Exact decimal fraction of the unit: frac / 10^digits * 2^shift.
        let digits = frac.len().min(18);
        let f: u128 = frac[..digits].parse().map_err(|_| bad())?;
        let denom = 10u128.pow(digits as u32);
        part = ((f << shift) / denom) as u64;
    }
    whole.checked_add(part).ok_or_else(bad)
}

/// Largest image size: sizes are signed 64-bit offsets in files and in
/// QEMU.
pub const MAX_IMAGE_SIZE: u64 = i64::MAX as u64;

/// Parses an image size ([`parse_size`]) and refuses one past
/// [`MAX_IMAGE_SIZE`] with qemu-img's words.
pub fn parse_image_size(text: &str) -> Result<u64> {
    let range = || {
        Error::invalid_argument(format!(
            "Invalid image size specified. Must be between 0 and {MAX_IMAGE_SIZE}."
        ))
    };
    match parse_size(text) {
        Ok(v) if v <= MAX_IMAGE_SIZE => Ok(v),
        Ok(_) => Err(range()),
        // A plain number too large for 64 bits is out of range too.
        Err(_) if !text.trim().is_empty() && text.trim().bytes().all(|b| b.is_ascii_digit()) => {
            Err(range())
        }
        Err(e) => Err(e),
    }
}

/// Formats bytes like qemu-img's human output: `10 MiB`, `1.5 GiB`, `512 B`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    // Three significant digits, like qemu's size_to_str.
    let s = if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s} {}", UNITS[i])
}

#[cfg(test)]
mod tests {
    #[test]
    fn image_sizes_past_the_signed_64_bit_range_are_refused_with_the_range() {
        for t in [
            "18446744073709551615",
            "9223372036854775808",
            "99999999999999999999",
            "8E",
        ] {
            let e = super::parse_image_size(t).unwrap_err();
            assert!(
                e.to_string()
                    .contains("Must be between 0 and 9223372036854775807"),
                "{t}: {e}"
            );
        }
        assert_eq!(
            super::parse_image_size("9223372036854775807").unwrap(),
            i64::MAX as u64
        );
        assert!(super::parse_image_size("12Q").is_err());
    }

    use super::*;

    #[test]
    fn suffixes_are_binary_and_case_insensitive() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert_eq!(parse_size("1P").unwrap(), 1 << 50);
        assert_eq!(parse_size("512b").unwrap(), 512);
    }

    #[test]
    fn fractions_of_a_unit_are_exact() {
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("0.5k").unwrap(), 512);
    }

    #[test]
    fn garbage_and_overflow_are_rejected_with_the_text_in_the_message() {
        for bad in ["12Q", "", "k", "1.2.3M", "-5", "1.5", "99999999999E", "abc"] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.to_string().contains("Invalid image size"), "{bad}: {e}");
        }
    }

    #[test]
    fn human_sizes_look_like_qemu_img() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(10 << 20), "10 MiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
        assert_eq!(human_size(135168), "132 KiB");
    }
}
