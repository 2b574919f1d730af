//! The anti-forensic splitter of LUKS1: a key is stored as `stripes`
//! blocks, all but the last random, joined by a hash-based diffusion, so
//! that wiping any part of the stored material destroys the key.

use super::hash::HashAlg;
use zeroize::Zeroizing;

/// Diffuses `buf` in place: each digest-sized piece `i` becomes the hash
/// of the big-endian 32-bit `i` and the piece, cut to the piece's length.
fn diffuse(hash: HashAlg, buf: &mut [u8]) {
    let d = hash.digest_len();
    for (i, piece) in buf.chunks_mut(d).enumerate() {
        let h = Zeroizing::new(hash.digest(&[&(i as u32).to_be_bytes(), piece]));
        piece.copy_from_slice(&h[..piece.len()]);
    }
}

/// XORs `src` into `dst`.
fn xor(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

/// The key of `key_len` bytes that `material` (`stripes` blocks of
/// `key_len` bytes) holds.
pub fn merge(hash: HashAlg, material: &[u8], key_len: usize, stripes: usize) -> Zeroizing<Vec<u8>> {
    let mut acc = Zeroizing::new(vec![0u8; key_len]);
    for s in 0..stripes - 1 {
        xor(&mut acc, &material[s * key_len..(s + 1) * key_len]);
        diffuse(hash, &mut acc);
    }
    xor(
        &mut acc,
        &material[(stripes - 1) * key_len..stripes * key_len],
    );
    acc
}

/// Material of `stripes` blocks that [`merge`] turns back into `key`; the
/// random blocks come from `random`.
pub fn split(
    hash: HashAlg,
    key: &[u8],
    stripes: usize,
    random: &mut dyn FnMut(&mut [u8]),
) -> Zeroizing<Vec<u8>> {
    let n = key.len();
    let mut out = Zeroizing::new(vec![0u8; n * stripes]);
    random(&mut out[..n * (stripes - 1)]);
    let mut acc = Zeroizing::new(vec![0u8; n]);
    for s in 0..stripes - 1 {
        xor(&mut acc, &out[s * n..(s + 1) * n]);
        diffuse(hash, &mut acc);
    }
    let last = &mut out[(stripes - 1) * n..];
    last.copy_from_slice(key);
    xor(last, &acc);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_then_merge_gives_the_key_back_for_short_last_pieces_too() {
        let mut seed = 1u8;
        let mut random = |b: &mut [u8]| {
            for x in b {
                seed = seed.wrapping_mul(73).wrapping_add(11);
                *x = seed;
            }
        };
        for (hash, len) in [
            (HashAlg::Sha256, 64),
            (HashAlg::Sha1, 32),
            (HashAlg::Sha512, 32),
            (HashAlg::Sha384, 64),
        ] {
            let key: Vec<u8> = (0..len as u8).collect();
            let m = split(hash, &key, 4000, &mut random);
            assert_eq!(m.len(), len * 4000);
            assert_eq!(&merge(hash, &m, len, 4000)[..], &key[..], "{hash:?}");
            // Changing any stripe changes the key.
            let mut bad = m.clone();
            bad[len * 17] ^= 1;
            assert_ne!(&merge(hash, &bad, len, 4000)[..], &key[..]);
        }
    }
}
