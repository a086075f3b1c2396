//! Bad files give clear errors, never panics: every truncation of a valid file, unknown
//! types, contradicting shapes, hostile counts and offsets.

use rooftop_gguf::{kernels, GgmlType, GgufError, GgufFile, GgufMatrix, GgufWriter, Value};

fn valid() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.kv("general.architecture", Value::String("llama".into()))
        .kv("general.alignment", Value::U32(64))
        .kv("list", Value::Array(vec![Value::U32(1), Value::U32(2)]))
        .tensor("a", GgmlType::Q8_0, &[32, 2], vec![0; 2 * 34])
        .tensor("b", GgmlType::F32, &[3], vec![0; 12]);
    w.to_bytes()
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = valid();
    assert!(GgufFile::from_bytes(bytes.clone()).is_ok());
    for len in 0..bytes.len() {
        match GgufFile::from_bytes(bytes[..len].to_vec()) {
            Err(GgufError::Truncated { .. }) | Err(GgufError::BadMagic(_)) => {}
            Err(e) => panic!("prefix {len}: unexpected error {e}"),
            Ok(_) => panic!("prefix {len} of {} parsed", bytes.len()),
        }
    }
}

/// Offset of the first tensor info's type field in `valid()`-like files.
fn patch_tensor_field(bytes: &mut [u8], name: &str, field_from_name_end: usize, v: &[u8]) {
    let pat = [&(name.len() as u64).to_le_bytes()[..], name.as_bytes()].concat();
    let at = bytes
        .windows(pat.len())
        .position(|w| w == pat)
        .expect("tensor name")
        + pat.len()
        + field_from_name_end;
    bytes[at..at + v.len()].copy_from_slice(v);
}

#[test]
fn unknown_tensor_type_names_the_tensor() {
    let mut bytes = valid();
    // name, n_dims u32, 2 dims u64, then the type id.
    patch_tensor_field(&mut bytes, "a", 4 + 16, &77u32.to_le_bytes());
    let e = GgufFile::from_bytes(bytes).err().expect("error");
    assert!(
        matches!(e, GgufError::UnknownType { ref tensor, id: 77 } if tensor == "a"),
        "{e}"
    );
}

#[test]
fn shape_that_contradicts_the_data_is_an_error() {
    // Rows of 33 are not whole Q8_0 blocks.
    let mut bytes = valid();
    patch_tensor_field(&mut bytes, "a", 4, &33u64.to_le_bytes());
    let e = GgufFile::from_bytes(bytes).err().expect("error");
    assert!(e.to_string().contains("tensor a"), "{e}");
    // More rows than the data section holds.
    let mut bytes = valid();
    patch_tensor_field(&mut bytes, "a", 4 + 8, &1000u64.to_le_bytes());
    assert!(matches!(
        GgufFile::from_bytes(bytes),
        Err(GgufError::Truncated { .. })
    ));
    // A product that overflows u64.
    let mut bytes = valid();
    patch_tensor_field(&mut bytes, "a", 4 + 8, &u64::MAX.to_le_bytes());
    assert!(GgufFile::from_bytes(bytes).is_err());
    // Too many dimensions.
    let mut bytes = valid();
    patch_tensor_field(&mut bytes, "a", 0, &9u32.to_le_bytes());
    assert!(GgufFile::from_bytes(bytes).is_err());
    // Misaligned offset.
    let mut bytes = valid();
    patch_tensor_field(&mut bytes, "b", 4 + 8 + 4, &3u64.to_le_bytes());
    assert!(GgufFile::from_bytes(bytes).is_err());
}

#[test]
fn hostile_header_counts_do_not_allocate() {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&u64::MAX.to_le_bytes()); // tensors
    b.extend_from_slice(&u64::MAX.to_le_bytes()); // kv
    assert!(matches!(
        GgufFile::from_bytes(b),
        Err(GgufError::Truncated { .. })
    ));
    // An array claiming 2^60 elements.
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b'k');
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&4u32.to_le_bytes());
    b.extend_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(matches!(
        GgufFile::from_bytes(b),
        Err(GgufError::Truncated { .. })
    ));
}

#[test]
fn bad_magic_version_and_values() {
    assert!(matches!(
        GgufFile::from_bytes(b"GGML\x03\0\0\0".to_vec()),
        Err(GgufError::BadMagic(_))
    ));
    let mut b = valid();
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(matches!(
        GgufFile::from_bytes(b),
        Err(GgufError::Version(1))
    ));
    // Big-endian files read as a huge version.
    let mut b = valid();
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert!(matches!(
        GgufFile::from_bytes(b),
        Err(GgufError::Version(_))
    ));
    // A metadata value type that does not exist.
    let mut b = valid();
    let at = 24 + 8 + "general.architecture".len();
    b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    assert!(matches!(
        GgufFile::from_bytes(b),
        Err(GgufError::ValueType { ty: 99, .. })
    ));
}

#[test]
fn requests_against_a_good_file_fail_cleanly() {
    let f = GgufFile::from_bytes(valid()).unwrap();
    assert!(matches!(f.info("nope"), Err(GgufError::MissingTensor(_))));
    assert!(matches!(
        f.metadata.u64("nope"),
        Err(GgufError::MissingKey(_))
    ));
    assert!(matches!(
        f.metadata.u64("general.architecture"),
        Err(GgufError::WrongType { .. })
    ));
    assert!(f.matrix("b").is_err(), "1-D tensor is not a matrix");
    let m = f.matrix("a").unwrap();
    let mut y = [0f32; 2];
    assert!(kernels::matmul(&m, &[0.0; 31], 1, &mut y).is_err());
    assert!(GgufMatrix::new(GgmlType::Q8_0, 2, 32, &[0; 67]).is_err());
    assert!(matches!(
        GgufMatrix::new(GgmlType::IQ2_XXS, 1, 256, &[0; 66]),
        Err(GgufError::Unsupported { .. })
    ));
}

fn tiny_llama(arch: &str, heads_kv: u32) -> Vec<u8> {
    let mut w = GgufWriter::new();
    let f32s = |n: usize| vec![0u8; n * 4];
    w.kv("general.architecture", Value::String(arch.into()))
        .kv(&format!("{arch}.block_count"), Value::U32(1))
        .kv(&format!("{arch}.embedding_length"), Value::U32(32))
        .kv(&format!("{arch}.feed_forward_length"), Value::U32(64))
        .kv(&format!("{arch}.attention.head_count"), Value::U32(2))
        .kv(
            &format!("{arch}.attention.head_count_kv"),
            Value::U32(heads_kv),
        )
        .kv(&format!("{arch}.vocab_size"), Value::U32(4));
    w.tensor("token_embd.weight", GgmlType::F32, &[32, 4], f32s(128))
        .tensor("output_norm.weight", GgmlType::F32, &[32], f32s(32))
        .tensor("blk.0.attn_norm.weight", GgmlType::F32, &[32], f32s(32))
        .tensor("blk.0.attn_q.weight", GgmlType::F32, &[32, 32], f32s(1024))
        .tensor("blk.0.attn_k.weight", GgmlType::F32, &[32, 16], f32s(512))
        .tensor("blk.0.attn_v.weight", GgmlType::F32, &[32, 16], f32s(512))
        .tensor(
            "blk.0.attn_output.weight",
            GgmlType::F32,
            &[32, 32],
            f32s(1024),
        )
        .tensor("blk.0.ffn_norm.weight", GgmlType::F32, &[32], f32s(32))
        .tensor(
            "blk.0.ffn_gate.weight",
            GgmlType::F32,
            &[32, 64],
            f32s(2048),
        )
        .tensor("blk.0.ffn_up.weight", GgmlType::F32, &[32, 64], f32s(2048))
        .tensor(
            "blk.0.ffn_down.weight",
            GgmlType::F32,
            &[64, 32],
            f32s(2048),
        );
    w.to_bytes()
}

#[test]
fn architecture_errors_are_clear() {
    use rooftop_gguf::Hparams;
    let ok = GgufFile::from_bytes(tiny_llama("llama", 1)).unwrap();
    let hp = Hparams::from_file(&ok).unwrap();
    assert_eq!(
        (hp.kv_heads, hp.head_dim, hp.tied_embeddings),
        (1, 16, true)
    );
    // Unknown architecture.
    let f = GgufFile::from_bytes(tiny_llama("mamba9", 1)).unwrap();
    let e = Hparams::from_file(&f).unwrap_err().to_string();
    assert!(e.contains("mamba9") && e.contains("not supported"), "{e}");
    // Metadata says 2 kv heads: attn_k [32, 16] contradicts [32, 32].
    let f = GgufFile::from_bytes(tiny_llama("llama", 2)).unwrap();
    let e = Hparams::from_file(&f).unwrap_err().to_string();
    assert!(
        e.contains("blk.0.attn_k.weight") && e.contains("contradicts"),
        "{e}"
    );
    // kv heads that do not divide the heads.
    let f = GgufFile::from_bytes(tiny_llama("llama", 3)).unwrap();
    assert!(Hparams::from_file(&f).is_err());
    // A tensor the architecture needs is missing (qwen3 wants qk-norm weights).
    let f = GgufFile::from_bytes(tiny_llama("qwen3", 1)).unwrap();
    let e = Hparams::from_file(&f).unwrap_err();
    assert!(
        matches!(e, GgufError::MissingTensor(ref n) if n == "blk.0.attn_q_norm.weight"),
        "{e}"
    );
}
