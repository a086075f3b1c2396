//! Dequantization and reading checked against gguf-py (tests/oracle/gguf_dequant.py):
//! every supported type must decode to exactly the same f32 bits.

use rand::{Rng, SeedableRng};
use rooftop_gguf::kernels::{dequantize_row, matmul, matmul_f32, matmul_portable, matmul_ref};
use rooftop_gguf::{GgmlType, GgufFile, GgufMatrix, GgufWriter, Value};
use rooftop_oracle::TempDir;
use std::path::Path;

/// Byte offsets of each type's f16 scale fields within a block, so random blocks get
/// sane (finite, moderate) scales while every other bit is random.
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    use GgmlType as T;
    match ty {
        T::Q4_0 | T::Q5_0 | T::Q8_0 => &[0],
        T::Q4_1 | T::Q5_1 | T::Q4_K | T::Q5_K => &[0, 2],
        T::Q2_K => &[80, 82],
        T::Q3_K => &[108],
        T::Q6_K => &[208],
        _ => &[],
    }
}

/// `rows` rows of `cols` values of `ty`: random bits with sane f16 scales. MXFP4's
/// E8M0 exponent stays fully random (subnormal and huge scales are part of the format)
/// unless `moderate`, which keeps sums finite for the kernel comparison.
fn random_tensor(
    ty: GgmlType,
    rows: usize,
    cols: usize,
    moderate: bool,
    rng: &mut impl Rng,
) -> Vec<u8> {
    use GgmlType as T;
    let n = rows * cols;
    match ty {
        T::F32 => (0..n)
            .flat_map(|_| (rng.random::<f32>() * 8.0 - 4.0).to_le_bytes())
            .collect(),
        T::F16 => (0..n)
            .flat_map(|_| half::f16::from_f32(rng.random::<f32>() * 8.0 - 4.0).to_le_bytes())
            .collect(),
        T::BF16 => (0..n)
            .flat_map(|_| half::bf16::from_f32(rng.random::<f32>() * 8.0 - 4.0).to_le_bytes())
            .collect(),
        _ => {
            let (qk, bs) = (ty.block_size(), ty.type_size());
            let mut data: Vec<u8> = (0..n / qk * bs).map(|_| rng.random()).collect();
            for block in data.chunks_exact_mut(bs) {
                for &off in f16_fields(ty) {
                    let s = half::f16::from_f32((rng.random::<f32>() - 0.3) * 0.1);
                    block[off..off + 2].copy_from_slice(&s.to_le_bytes());
                }
                if ty == T::MXFP4 && moderate {
                    block[0] = rng.random_range(110..=135);
                }
            }
            data
        }
    }
}

const ALL: [GgmlType; 14] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::MXFP4,
];

fn read_f32(path: &Path) -> Vec<f32> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Every tensor of `file` dequantized by us equals gguf-py bit for bit.
fn assert_matches_oracle(file: &Path, dir: &Path) -> usize {
    let out = dir.join("oracle");
    rooftop_oracle::run("gguf_dequant.py", &[Path::new("dequant"), file, &out]);
    let g = GgufFile::open(file).unwrap();
    for t in &g.tensors {
        let ours = g.tensor_f32(&t.name).unwrap();
        let theirs = read_f32(&out.join(format!("{}.f32", t.name)));
        assert_eq!(ours.len(), theirs.len(), "{}", t.name);
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{} ({}): value {i}: ours {a}, gguf-py {b}",
                t.name,
                t.ty
            );
        }
    }
    g.tensors.len()
}

#[test]
fn random_blocks_of_every_type_dequantize_like_gguf_py() {
    if rooftop_oracle::skip_requested() {
        return;
    }
    let dir = TempDir::new("gguf-dequant");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut w = GgufWriter::new();
    w.kv("general.architecture", Value::String("llama".into()));
    for ty in ALL {
        // 3 rows of 512: two K-quant super-blocks or sixteen 32-blocks per row.
        w.tensor(
            &format!("t.{ty}"),
            ty,
            &[512, 3],
            random_tensor(ty, 3, 512, false, &mut rng),
        );
    }
    let path = dir.path().join("random.gguf");
    std::fs::write(&path, w.to_bytes()).unwrap();
    assert_eq!(assert_matches_oracle(&path, dir.path()), ALL.len());
}

#[test]
fn gguf_py_quantized_file_reads_and_dequantizes_exactly() {
    if rooftop_oracle::skip_requested() {
        return;
    }
    let dir = TempDir::new("gguf-pyq");
    let path = dir.path().join("pyq.gguf");
    rooftop_oracle::run("gguf_dequant.py", &[Path::new("make"), &path]);
    assert_eq!(assert_matches_oracle(&path, dir.path()), 9);

    // Metadata written by gguf-py's writer, every value type.
    let g = GgufFile::open(&path).unwrap();
    let md = &g.metadata;
    assert_eq!(g.alignment, 64);
    assert_eq!(md.get("test.u8"), Some(&Value::U8(200)));
    assert_eq!(md.get("test.i8"), Some(&Value::I8(-100)));
    assert_eq!(md.get("test.u16"), Some(&Value::U16(60000)));
    assert_eq!(md.get("test.i16"), Some(&Value::I16(-30000)));
    assert_eq!(md.get("test.u32"), Some(&Value::U32(4_000_000_000)));
    assert_eq!(md.get("test.i32"), Some(&Value::I32(-2_000_000_000)));
    assert_eq!(md.get("test.f32"), Some(&Value::F32(1.5)));
    assert_eq!(md.get("test.bool"), Some(&Value::Bool(true)));
    assert_eq!(md.str("test.string").unwrap(), "héllo ▁wörld");
    assert_eq!(md.get("test.u64"), Some(&Value::U64((1 << 63) + 5)));
    assert_eq!(md.get("test.i64"), Some(&Value::I64(-(1 << 62))));
    assert_eq!(md.get("test.f64"), Some(&Value::F64(-2.25)));
    assert_eq!(md.strings("test.arr_str").unwrap(), ["a", "bc", ""]);
    assert_eq!(md.i64s("test.arr_i32").unwrap(), [1, -2, 3]);
    assert_eq!(md.f32s("test.arr_f32").unwrap(), [0.5, -0.25]);
    // Keys and types as gguf-py saw them.
    let meta = std::fs::read_to_string(dir.path().join("oracle/meta.txt")).unwrap();
    let ours: Vec<&str> = md.iter().map(|(k, _)| k).collect();
    let theirs: Vec<&str> = meta
        .lines()
        .map(|l| l.split('\t').next().unwrap())
        .collect();
    assert_eq!(ours, theirs);
}

/// The kernels on blocks agree with dequantize-then-dot for every type and batch size:
/// `matmul_f32` within f32 rounding; `matmul` (int8 activations, as llama.cpp) within
/// what quantizing x can move (half a step of each activation block, plus its f16
/// scale), and the AVX2 path bit-identical to the portable one.
#[test]
fn matmul_on_blocks_matches_reference() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let (rows, cols) = (37, 768);
    for ty in ALL {
        let data = random_tensor(ty, rows, cols, true, &mut rng);
        let w = GgufMatrix::new(ty, rows, cols, &data).unwrap();
        let mut wd = vec![0f32; rows * cols];
        dequantize_row(ty, &data, &mut wd).unwrap();
        for n in [1, 3] {
            let x: Vec<f32> = (0..n * cols)
                .map(|_| rng.random::<f32>() * 2.0 - 1.0)
                .collect();
            let mut r = vec![0f32; n * rows];
            matmul_ref(&w, &x, n, &mut r).unwrap();
            let scale = r.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
            let mut y = vec![0f32; n * rows];
            matmul_f32(&w, &x, n, &mut y).unwrap();
            for (i, (a, b)) in y.iter().zip(&r).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * scale,
                    "{ty} f32 n={n} [{i}]: {a} vs {b}"
                );
            }
            let (mut q, mut p) = (vec![0f32; n * rows], vec![0f32; n * rows]);
            matmul(&w, &x, n, &mut q).unwrap();
            matmul_portable(&w, &x, n, &mut p).unwrap();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&q),
                bits(&p),
                "{ty} n={n}: fast and portable paths differ"
            );
            let ab = if ty.block_size() == 256 { 256 } else { 32 }; // activation block
            for t in 0..n {
                let xt = &x[t * cols..(t + 1) * cols];
                for o in 0..rows {
                    let bound: f32 = (0..cols)
                        .map(|j| {
                            let b = &xt[j / ab * ab..(j / ab + 1) * ab];
                            let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                            wd[o * cols + j].abs() * amax * (1.0 / 254.0 + 1.0 / 1024.0)
                        })
                        .sum::<f32>()
                        + 1e-4 * scale;
                    let (a, b) = (q[t * rows + o], r[t * rows + o]);
                    assert!(
                        (a - b).abs() <= bound,
                        "{ty} int8 n={n} [{t},{o}]: {a} vs {b}"
                    );
                }
            }
        }
        // And a row decoded on its own equals the same row of the whole tensor.
        let mut row = vec![0f32; cols];
        w.row_f32(5, &mut row);
        let mut all = vec![0f32; rows * cols];
        dequantize_row(ty, &data, &mut all).unwrap();
        assert_eq!(row, all[5 * cols..6 * cols]);
    }
}
