//! MLX's bit packing: values form one LSB-first bit stream along the row, stored as
//! little-endian u32 words. For 2/4/8 bits that is `32/bits` values per word; 3- and
//! 5-bit values pack 8 per 3 or 5 bytes and 6-bit 4 per 3 bytes, crossing word
//! boundaries — the same stream. A group (≥32 values) always fills whole words.

/// Pack `codes` (each < 2^bits) into `out` (len = codes.len()*bits/32).
#[inline]
pub fn pack(codes: &[u8], bits: u32, out: &mut [u32]) {
    debug_assert_eq!(codes.len() * bits as usize, out.len() * 32);
    match bits {
        2 | 4 | 8 | 1 => {
            let per = (32 / bits) as usize;
            for (w, chunk) in out.iter_mut().zip(codes.chunks_exact(per)) {
                let mut v = 0u32;
                for (k, &c) in chunk.iter().enumerate() {
                    v |= (c as u32) << (k as u32 * bits);
                }
                *w = v;
            }
        }
        _ => {
            let mut acc: u64 = 0;
            let mut nacc = 0u32;
            let mut wi = 0;
            for &c in codes {
                acc |= (c as u64) << nacc;
                nacc += bits;
                if nacc >= 32 {
                    out[wi] = acc as u32;
                    wi += 1;
                    acc >>= 32;
                    nacc -= 32;
                }
            }
        }
    }
}

/// Unpack `out.len()` codes from `words` (inverse of [`pack`]).
#[inline]
pub fn unpack(words: &[u32], bits: u32, out: &mut [u8]) {
    let mask = (1u64 << bits) - 1;
    match bits {
        2 | 4 | 8 | 1 => {
            let per = (32 / bits) as usize;
            for (&w, chunk) in words.iter().zip(out.chunks_exact_mut(per)) {
                for (k, c) in chunk.iter_mut().enumerate() {
                    *c = ((w >> (k as u32 * bits)) as u64 & mask) as u8;
                }
            }
        }
        _ => {
            let mut acc: u64 = 0;
            let mut nacc = 0u32;
            let mut wi = 0;
            for c in out.iter_mut() {
                if nacc < bits {
                    acc |= (words[wi] as u64) << nacc;
                    wi += 1;
                    nacc += 32;
                }
                *c = (acc & mask) as u8;
                acc >>= bits;
                nacc -= bits;
            }
        }
    }
}

/// Unpack `out.len()` codes from little-endian packed bytes (no alignment needed).
#[inline]
pub fn unpack_bytes(bytes: &[u8], bits: u32, out: &mut [u8]) {
    debug_assert!(bytes.len() * 8 >= out.len() * bits as usize);
    match bits {
        8 => out.copy_from_slice(&bytes[..out.len()]),
        4 => {
            for (o, &b) in out.chunks_exact_mut(2).zip(bytes) {
                o[0] = b & 15;
                o[1] = b >> 4;
            }
        }
        2 => {
            for (o, &b) in out.chunks_exact_mut(4).zip(bytes) {
                o[0] = b & 3;
                o[1] = (b >> 2) & 3;
                o[2] = (b >> 4) & 3;
                o[3] = b >> 6;
            }
        }
        _ => {
            // 1, 3, 5, 6 bits: a bit stream read through a 64-bit window.
            let mask = (1u64 << bits) - 1;
            let (mut acc, mut nacc, mut bi) = (0u64, 0u32, 0usize);
            for c in out.iter_mut() {
                while nacc < bits {
                    acc |= (bytes[bi] as u64) << nacc;
                    bi += 1;
                    nacc += 8;
                }
                *c = (acc & mask) as u8;
                acc >>= bits;
                nacc -= bits;
            }
        }
    }
}

/// Code `i` of a packed row, read straight from little-endian bytes (unaligned-safe).
#[inline(always)]
pub fn code_at(bytes: &[u8], bits: u32, i: usize) -> u32 {
    let bit = i * bits as usize;
    let byte = bit / 8;
    let shift = (bit % 8) as u32;
    let mut v = bytes[byte] as u32;
    if shift + bits > 8 {
        v |= (bytes[byte + 1] as u32) << 8;
    }
    (v >> shift) & ((1 << bits) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(bits in prop::sample::select(vec![1u32, 2, 3, 4, 5, 6, 8]),
                      groups in 1usize..6, seed in any::<u64>()) {
            let n = 32 * groups;
            let mut s = seed;
            let codes: Vec<u8> = (0..n).map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as u8) & ((1u16 << bits) - 1) as u8
            }).collect();
            let mut words = vec![0u32; n * bits as usize / 32];
            pack(&codes, bits, &mut words);
            let mut back = vec![0u8; n];
            unpack(&words, bits, &mut back);
            prop_assert_eq!(&back, &codes);
            let bytes: Vec<u8> = bytemuck::cast_slice(&words).to_vec();
            for (i, &c) in codes.iter().enumerate() {
                prop_assert_eq!(code_at(&bytes, bits, i), c as u32);
            }
            let mut from_bytes = vec![0u8; n];
            unpack_bytes(&bytes, bits, &mut from_bytes);
            prop_assert_eq!(&from_bytes, &codes);
        }
    }

    #[test]
    fn three_bit_matches_mlx_byte_layout() {
        // MLX packs 8 3-bit values into 3 bytes: value k at bits 3k..3k+3.
        let codes = [1u8, 2, 3, 4, 5, 6, 7, 0].repeat(4);
        let mut words = [0u32; 3];
        pack(&codes, 3, &mut words);
        let b: &[u8] = bytemuck::cast_slice(&words);
        let expect: u32 = (0..8).map(|k| (codes[k] as u32) << (3 * k)).sum();
        assert_eq!(
            b[0] as u32 | (b[1] as u32) << 8 | (b[2] as u32) << 16,
            expect
        );
    }
}
