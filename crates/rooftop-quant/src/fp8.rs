//! Minifloat codecs: E4M3 (OCP "fn" variant, max 448), E8M0 (power-of-two scale) and
//! E2M1 (FP4). The encoders reproduce MLX's CPU conversions bit for bit, including
//! its corner behaviour (|x| >= 480 saturates to 0x7E; (464, 480) rounds to 0x7F,
//! which MLX decodes as 480, not NaN).

/// E2M1 code → value. Codes 8..15 are the negatives; code 8 is -0.
pub const E2M1_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;
/// Largest E2M1 value.
pub const E2M1_MAX: f32 = 6.0;

/// f32 → E4M3 with round-to-nearest-even and saturation (MLX `to_fp8`).
#[inline]
pub fn e4m3_from_f32(x: f32) -> u8 {
    const FP8_MAX_BITS: u32 = 543 << 21; // 480.0
    const DENORM_MASK: u32 = 141 << 23;
    let mut bits = x.to_bits();
    let sign = bits & 0x8000_0000;
    bits ^= sign;
    let out = if bits >= FP8_MAX_BITS {
        0x7E
    } else if bits < (121 << 23) {
        // Subnormal range: let the FPU's own rounding place the mantissa by adding a
        // large power of two whose ulp equals the E4M3 subnormal step.
        let low = (f32::from_bits(bits) + f32::from_bits(DENORM_MASK)).to_bits();
        low.wrapping_sub(DENORM_MASK) as u8
    } else {
        let mant_odd = (bits >> 20) & 1;
        let high = bits
            .wrapping_add(((7u32).wrapping_sub(127) << 23).wrapping_add(0x7FFFF))
            .wrapping_add(mant_odd);
        (high >> 20) as u8
    };
    out | (sign >> 24) as u8
}

/// E4M3 → f32 as MLX decodes it (0x7F/0xFF decode to ±480, not NaN).
#[inline]
pub fn e4m3_to_f32(x: u8) -> f32 {
    let v = ((x & 127) as u16) << 7;
    let mag = half::f16::from_bits(v).to_f32() * 256.0;
    if x & 128 != 0 {
        -mag
    } else {
        mag
    }
}

/// Lookup table for all 256 E4M3 codes.
pub fn e4m3_table() -> [f32; 256] {
    let mut t = [0.0; 256];
    for (i, v) in t.iter_mut().enumerate() {
        *v = e4m3_to_f32(i as u8);
    }
    t
}

/// E8M0 code → scale 2^(code-127), computed in f32 (exact for every code but 255).
#[inline]
pub fn e8m0_to_f32(x: u8) -> f32 {
    (x as f32 - 127.0).exp2()
}

/// Encode an already-scaled value to the nearest E2M1 code, ties toward the smaller
/// magnitude and zero always as +0. This is what MLX's `argmin |x - lut|` selects
/// (first minimum wins; the neighbouring differences are exact by Sterbenz's lemma).
#[inline(always)]
pub fn e2m1_encode(x: f32) -> u8 {
    let a = x.abs();
    // NaN and ±inf (a zero scale) land on code 0, as MLX's argmin does: no |x-lut|
    // is strictly below the first.
    let code = if a <= 0.25 || !a.is_finite() {
        return 0;
    } else if a <= 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a <= 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a <= 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    };
    if x < 0.0 {
        code | 8
    } else {
        code
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_round_trips_every_finite_code() {
        for c in 0u8..=255 {
            if c & 0x7F == 0x7F {
                continue;
            }
            let v = e4m3_to_f32(c);
            let back = e4m3_from_f32(v);
            if v == 0.0 {
                assert_eq!(back & 0x7F, 0);
            } else {
                assert_eq!(back, c, "code {c:#x} value {v}");
            }
        }
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_from_f32(1e6), 0x7E);
        assert_eq!(e4m3_from_f32(-1e6), 0xFE);
    }

    #[test]
    fn e2m1_ties_go_to_smaller_magnitude() {
        assert_eq!(e2m1_encode(0.25), 0);
        assert_eq!(e2m1_encode(-0.25), 0);
        assert_eq!(e2m1_encode(0.2500001), 1);
        assert_eq!(e2m1_encode(3.5), 5);
        assert_eq!(e2m1_encode(5.0), 6);
        assert_eq!(e2m1_encode(-7.0), 15);
        assert_eq!(e2m1_encode(-0.75), 9);
        for (c, v) in E2M1_VALUES.iter().enumerate() {
            if c != 8 {
                assert_eq!(e2m1_encode(*v) as usize, c);
            }
        }
    }
}
