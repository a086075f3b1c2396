//! Broken model directories and requests fail with an error naming the file and
//! tensor — never a panic. Each case starts from a valid mlx-lm-made model and breaks
//! one thing.

use rooftop_engine::{EngineError, GenerateOptions, Generator, Model, Tokenizer};
use rooftop_oracle::TempDir;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// One oracle model shared by every case: (temp dir, hf dir, affine4 dir).
fn fixture() -> Option<&'static (TempDir, PathBuf, PathBuf)> {
    if rooftop_oracle::skip_requested() {
        return None;
    }
    static F: OnceLock<(TempDir, PathBuf, PathBuf)> = OnceLock::new();
    Some(F.get_or_init(|| {
        let tmp = TempDir::new("bad-input");
        let out = tmp.path().join("m");
        rooftop_oracle::run(
            "mlx_lm_model.py",
            &[Path::new("qwen3_moe"), &out, Path::new("affine4")],
        );
        (tmp, out.join("hf"), out.join("affine4"))
    }))
}

/// Copy `src` to a fresh directory next to it.
fn copy_dir(src: &Path, tag: &str) -> PathBuf {
    let dst = src.with_file_name(format!(
        "{}-{tag}",
        src.file_name().unwrap().to_str().unwrap()
    ));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
    dst
}

/// Rewrite `file` with `edit` applied to its (name → (dtype, shape, bytes)) map.
fn rewrite(file: &Path, edit: impl FnOnce(&mut BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>)) {
    let bytes = std::fs::read(file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut m: BTreeMap<_, _> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec())))
        .collect();
    edit(&mut m);
    let views: Vec<(String, TensorView)> = m
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, file).unwrap();
}

fn load_err(dir: &Path) -> EngineError {
    match Model::load(dir) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e,
    }
}

fn assert_mentions(e: &EngineError, parts: &[&str]) {
    let msg = e.to_string();
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} should mention {p:?}");
    }
}

#[test]
fn missing_tensor_is_named() {
    let Some((_, _, q)) = fixture() else { return };
    let d = copy_dir(q, "missing");
    rewrite(&d.join("model.safetensors"), |m| {
        m.remove("model.layers.1.self_attn.k_norm.weight");
    });
    let e = load_err(&d);
    assert!(matches!(e, EngineError::MissingTensor { .. }), "{e}");
    assert_mentions(&e, &["model.layers.1.self_attn.k_norm.weight"]);
}

#[test]
fn wrong_shape_is_named() {
    let Some((_, _, q)) = fixture() else { return };
    let d = copy_dir(q, "shape");
    rewrite(&d.join("model.safetensors"), |m| {
        m.get_mut("model.norm.weight").unwrap().1 = vec![2, 64];
    });
    let e = load_err(&d);
    assert!(matches!(e, EngineError::Shape { .. }), "{e}");
    assert_mentions(&e, &["model.norm.weight", "model.safetensors", "[2, 64]"]);
}

#[test]
fn wrong_dtype_is_named() {
    let Some((_, _, q)) = fixture() else { return };
    let d = copy_dir(q, "dtype");
    rewrite(&d.join("model.safetensors"), |m| {
        m.get_mut("model.layers.0.input_layernorm.weight")
            .unwrap()
            .0 = Dtype::I16;
    });
    let e = load_err(&d);
    assert!(matches!(e, EngineError::Dtype { .. }), "{e}");
    assert_mentions(&e, &["model.layers.0.input_layernorm.weight", "I16"]);
}

#[test]
fn unknown_model_type_is_rejected() {
    let Some((_, hf, _)) = fixture() else { return };
    let d = copy_dir(hf, "arch");
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    std::fs::write(
        d.join("config.json"),
        cfg.replace("\"qwen3_moe\"", "\"qwen9_moe\""),
    )
    .unwrap();
    let e = load_err(&d);
    assert!(matches!(e, EngineError::UnknownModelType(_)), "{e}");
    assert_mentions(&e, &["qwen9_moe"]);
}

#[test]
fn truncated_safetensors_is_rejected() {
    let Some((_, hf, _)) = fixture() else { return };
    let d = copy_dir(hf, "trunc");
    let f = d.join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&d);
    assert!(matches!(e, EngineError::Safetensors { .. }), "{e}");
    assert_mentions(&e, &["model-00002-of-00002.safetensors"]);
}

#[test]
fn corrupt_safetensors_header_is_rejected() {
    let Some((_, hf, _)) = fixture() else { return };
    let d = copy_dir(hf, "corrupt");
    let f = d.join("model-00001-of-00002.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[8..40].fill(b'#');
    std::fs::write(&f, &bytes).unwrap();
    let e = load_err(&d);
    assert!(matches!(e, EngineError::Safetensors { .. }), "{e}");
    assert_mentions(&e, &["model-00001-of-00002.safetensors"]);
}

#[test]
fn missing_shard_is_named() {
    let Some((_, hf, _)) = fixture() else { return };
    let d = copy_dir(hf, "noshard");
    std::fs::remove_file(d.join("model-00001-of-00002.safetensors")).unwrap();
    assert_mentions(&load_err(&d), &["model-00001-of-00002.safetensors"]);
}

#[test]
fn quantization_config_that_does_not_fit_is_rejected() {
    let Some((_, _, q)) = fixture() else { return };
    // Claim 3-bit where the tensors are 4-bit.
    let d = copy_dir(q, "qbits");
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    for k in ["quantization", "quantization_config"] {
        v[k]["bits"] = 3.into();
    }
    std::fs::write(d.join("config.json"), v.to_string()).unwrap();
    let e = load_err(&d);
    assert!(matches!(e, EngineError::Quant { .. }), "{e}");
    assert_mentions(&e, &["model.safetensors", ".weight"]);

    // Quantized tensors but no quantization section at all.
    let d = copy_dir(q, "qnone");
    v.as_object_mut().unwrap().remove("quantization");
    v.as_object_mut().unwrap().remove("quantization_config");
    std::fs::write(d.join("config.json"), v.to_string()).unwrap();
    let e = load_err(&d);
    assert!(matches!(e, EngineError::Quant { .. }), "{e}");
}

#[test]
fn prompt_longer_than_context_is_rejected() {
    let Some((_, hf, _)) = fixture() else { return };
    let model = Model::load(hf).unwrap();
    let tok = Tokenizer::load(hf).unwrap();
    let ids = tok
        .encode("The quick brown fox jumps over the lazy dog", false)
        .unwrap();
    let opts = GenerateOptions {
        max_context: Some(4),
        ..Default::default()
    };
    let e = Generator::new(&model, &tok, opts)
        .run(&ids, |_| {})
        .unwrap_err();
    assert!(
        matches!(e, EngineError::ContextOverflow { max: 4, .. }),
        "{e}"
    );
    // And at the model level: a cache cannot be overrun.
    let mut cache = model.new_cache(3);
    let e = model
        .forward(&ids, &mut cache, rooftop_engine::Logits::Last)
        .unwrap_err();
    assert!(matches!(e, EngineError::ContextOverflow { .. }), "{e}");
    let e = model
        .forward(
            &[100_000],
            &mut model.new_cache(3),
            rooftop_engine::Logits::Last,
        )
        .unwrap_err();
    assert!(matches!(e, EngineError::BadToken { .. }), "{e}");
}
