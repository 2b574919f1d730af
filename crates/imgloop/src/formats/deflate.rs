//! Raw deflate with exactly QEMU's parameters, through the system zlib
//! (qcow2 and qcow compressed clusters), and the matching inflate.
//!
//! QEMU compresses qcow2 clusters with `deflateInit2(level 6, raw,
//! 12-bit window, memory level 9)`. The memory level sets the size of
//! deflate's symbol buffer and so where blocks end: with flate2's fixed
//! level 8, large clusters come out a little bigger than qemu-img's. This
//! calls zlib (linked by `libz-sys`, the crate flate2 itself uses) with
//! the same parameters, so imgloop's streams are the bytes qemu-img writes.

use libz_sys as z;
use std::os::raw::{c_int, c_uint, c_void};

/// Memory allocation callback zlib requires (it has no default in the
/// Rust bindings): zeroed memory from the C allocator.
extern "C" fn zalloc(_opaque: z::voidpf, items: c_uint, size: c_uint) -> z::voidpf {
    // SAFETY: calloc takes two sizes and returns memory or null; zlib
    // checks for null.
    unsafe { libc::calloc(items as usize, size as usize) }
}

/// Frees what [`zalloc`] returned.
extern "C" fn zfree(_opaque: z::voidpf, ptr: z::voidpf) {
    // SAFETY: zlib hands back only pointers zalloc returned (or null).
    unsafe { libc::free(ptr) }
}

/// Compresses `input` into a raw deflate stream of at most `limit` bytes;
/// `None` when it does not fit (or zlib fails).
pub fn deflate_raw(input: &[u8], limit: usize) -> Option<Vec<u8>> {
    let avail_in = c_uint::try_from(input.len()).ok()?;
    let avail_out = c_uint::try_from(limit).ok()?;
    let mut out = vec![0u8; limit];
    let mut strm = z::z_stream {
        next_in: input.as_ptr().cast_mut(),
        avail_in,
        total_in: 0,
        next_out: out.as_mut_ptr(),
        avail_out,
        total_out: 0,
        msg: std::ptr::null_mut(),
        state: std::ptr::null_mut(),
        zalloc,
        zfree,
        opaque: std::ptr::null_mut::<c_void>(),
        data_type: 0,
        adler: 0,
        reserved: 0,
    };
    let stream_size = std::mem::size_of::<z::z_stream>() as c_int;
    // SAFETY: `strm` is a fully initialised z_stream that stays at this
    // address until deflateEnd; the version string is zlib's own.
    let rc = unsafe {
        z::deflateInit2_(
            &mut strm,
            6,
            z::Z_DEFLATED,
            -12,
            9,
            z::Z_DEFAULT_STRATEGY,
            z::zlibVersion(),
            stream_size,
        )
    };
    if rc != z::Z_OK {
        return None;
    }
    // SAFETY: next_in/avail_in describe `input` and next_out/avail_out
    // describe `out`, both alive and unaliased for this call; zlib only
    // reads the input (the binding's pointer type is mutable).
    let rc = unsafe { z::deflate(&mut strm, z::Z_FINISH) };
    let produced = limit - strm.avail_out as usize;
    // SAFETY: the stream was initialised by deflateInit2_ above.
    unsafe { z::deflateEnd(&mut strm) };
    if rc != z::Z_STREAM_END {
        return None;
    }
    out.truncate(produced);
    Some(out)
}

/// Inflates the raw deflate stream at the start of `input` (trailing bytes
/// are ignored) into `out`; returns the bytes produced.
pub fn inflate_raw(input: &[u8], out: &mut [u8]) -> Result<usize, flate2::DecompressError> {
    let mut d = flate2::Decompress::new(false);
    d.decompress(input, out, flate2::FlushDecompress::Finish)?;
    Ok(d.total_out() as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_inflate_back_and_a_too_small_limit_is_refused() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251 / 7) as u8).collect();
        let packed = deflate_raw(&data, data.len()).expect("compressible");
        assert!(packed.len() < data.len() / 4);
        let mut back = vec![0u8; data.len()];
        assert_eq!(inflate_raw(&packed, &mut back).unwrap(), data.len());
        assert_eq!(back, data);
        assert!(deflate_raw(&data, packed.len() - 1).is_none());
    }
}
