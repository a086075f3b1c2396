//! The int8 E2M1 lookup of the fp4 decode kernels (`fp4x8_i8` in quant.cuh), checked on
//! the CPU: its tables and selectors are read from the kernel source and run through a
//! model of PTX `prmt` (generic mode, which `__byte_perm` compiles to), then compared
//! with rooftop-quant's E2M1 values for every code in every nibble position.
use rooftop_quant::fp8::E2M1_VALUES;

const QUANT: &str = include_str!("../src/kernels/quant.cuh");

/// PTX `prmt.b32` generic mode: byte n of the result is byte `c[n] & 7` of {b, a}, or,
/// when bit 3 of that selector nibble is set, its sign bit replicated.
fn prmt(a: u32, b: u32, c: u32) -> u32 {
    let bytes = ((b as u64) << 32 | a as u64).to_le_bytes();
    let mut r = 0u32;
    for n in 0..4 {
        let sel = (c >> (4 * n)) & 0xF;
        let byte = bytes[(sel & 7) as usize];
        let out = if sel & 8 != 0 {
            if byte & 0x80 != 0 {
                0xFF
            } else {
                0
            }
        } else {
            byte
        };
        r |= (out as u32) << (8 * n);
    }
    r
}

/// The hex constant assigned to `name` in fp4x8_i8.
fn constant(name: &str) -> u32 {
    let body = &QUANT[QUANT.find("void fp4x8_i8(").expect("fp4x8_i8 in quant.cuh")..];
    let at = body
        .find(&format!("{name} = 0x"))
        .unwrap_or_else(|| panic!("{name}"))
        + name.len()
        + 5;
    u32::from_str_radix(&body[at..at + 8], 16).unwrap()
}

/// quant.cuh's fp4x8_i8 with its own constants (the masks and shifts as written there).
fn fp4x8_i8(w: u32) -> (u32, u32) {
    let (p0, p1, n0, n1) = (
        constant("P0"),
        constant("P1"),
        constant("N0"),
        constant("N1"),
    );
    let body = &QUANT[QUANT.find("void fp4x8_i8(").unwrap()..];
    assert!(body.contains("const u32 m = w & 0x77777777u;"));
    assert!(body.contains("const u32 s = ((w >> 1) & 0x44444444u) | 0x32103210u;"));
    let m = w & 0x7777_7777;
    let s = ((w >> 1) & 0x4444_4444) | 0x3210_3210;
    let lo = prmt(prmt(p0, p1, m), prmt(n0, n1, m), s);
    let hi = prmt(prmt(p0, p1, m >> 16), prmt(n0, n1, m >> 16), s >> 16);
    (lo, hi)
}

#[test]
fn fp4_lookup_gives_twice_every_e2m1_value_in_every_position() {
    let mut words: Vec<u32> = (0..16u32)
        .flat_map(|c| (0..8).map(move |k| c << (4 * k)))
        .collect();
    // Mixed words: every code next to every other, plus a pseudo-random sweep.
    words.extend((0..256u32).map(|i| (i & 15) | (i >> 4) << 4 | (i & 15) << 20 | (i >> 4) << 28));
    let mut x = 0x9E37_79B9u32;
    for _ in 0..4096 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        words.push(x);
    }
    for w in words {
        let (lo, hi) = fp4x8_i8(w);
        for k in 0..8 {
            let code = (w >> (4 * k)) & 15;
            let got = (if k < 4 {
                lo >> (8 * k)
            } else {
                hi >> (8 * (k - 4))
            }) as u8 as i8;
            let want = 2.0 * E2M1_VALUES[code as usize];
            assert_eq!(got as f32, want, "word {w:#010x} code {k} = {code:#x}");
        }
    }
}
