//! `rooftop quantize` against `mlx_lm.convert` on tiny random models of each
//! architecture: every shard, tensor (name, dtype, shape, bytes), the index and the
//! config must be identical, and mlx-lm must compute identical logits from both.

use rooftop_convert::{convert, ConvertError, Mixed, Options, Recipe};
use rooftop_oracle::TempDir;
use rooftop_quant::{DType, Method, QuantMode};
use safetensors::SafeTensors;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Default)]
struct Case {
    name: &'static str,
    quantize: bool,
    bits: Option<u32>,
    group: Option<usize>,
    mode: Option<QuantMode>,
    predicate: Option<&'static str>,
    dtype: Option<DType>,
    shard_bytes: Option<u64>,
}

fn cases() -> Vec<Case> {
    let q = |name, bits, group, mode| Case {
        name,
        quantize: true,
        bits,
        group,
        mode,
        ..Case::default()
    };
    let mixed = |name, group| Case {
        name,
        quantize: true,
        predicate: Some(name),
        group,
        ..Case::default()
    };
    vec![
        q("affine4", None, None, None),
        q("affine3", Some(3), None, None),
        q("affine3_g32", Some(3), Some(32), None),
        q("affine8_g128", Some(8), Some(128), None),
        q("nvfp4", None, None, Some(QuantMode::Nvfp4)),
        q("mxfp4", None, None, Some(QuantMode::Mxfp4)),
        q("mxfp8", None, None, Some(QuantMode::Mxfp8)),
        mixed("mixed_2_6", None),
        mixed("mixed_3_4", None),
        mixed("mixed_3_6", None),
        mixed("mixed_4_6", None),
        Case {
            name: "mixed_3_6_g32",
            predicate: Some("mixed_3_6"),
            ..mixed("mixed_3_6", Some(32))
        },
        Case {
            name: "affine4_f16",
            dtype: Some(DType::F16),
            ..q("affine4", None, None, None)
        },
        Case {
            name: "plain_f32",
            dtype: Some(DType::F32),
            ..Case::default()
        },
        Case {
            name: "affine4_sharded",
            shard_bytes: Some(20_000),
            ..q("affine4", None, None, None)
        },
    ]
}

fn options(c: &Case) -> Options {
    Options {
        quantize: c.quantize,
        bits: c.bits,
        group_size: c.group,
        mode: c.mode.unwrap_or(QuantMode::Affine),
        quant_predicate: c.predicate.map(|p| p.parse::<Mixed>().unwrap()),
        dtype: c.dtype,
        max_shard_bytes: c.shard_bytes.unwrap_or(5 << 30),
        ..Options::default()
    }
}

fn oracle_case(c: &Case, hf: &Path, out: &Path) -> Value {
    json!({
        "hf": hf, "out": out, "quantize": c.quantize, "q_bits": c.bits,
        "q_group_size": c.group, "q_mode": c.mode.map(|m| m.name()),
        "dtype": c.dtype.map(|d| d.name()), "quant_predicate": c.predicate,
        "shard_bytes": c.shard_bytes,
    })
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

fn shard_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    v.sort();
    v
}

/// Assert two converted models are the same, naming the first difference.
fn assert_same(ours: &Path, theirs: &Path, what: &str) {
    let files = shard_files(theirs);
    assert_eq!(shard_files(ours), files, "{what}: shard files differ");
    let mut count = 0;
    for f in &files {
        let a = std::fs::read(ours.join(f)).unwrap();
        let b = std::fs::read(theirs.join(f)).unwrap();
        let (sa, sb) = (
            SafeTensors::deserialize(&a).unwrap(),
            SafeTensors::deserialize(&b).unwrap(),
        );
        let (_, ma) = SafeTensors::read_metadata(&a).unwrap();
        let (_, mb) = SafeTensors::read_metadata(&b).unwrap();
        assert_eq!(ma.metadata(), mb.metadata(), "{what}/{f}: metadata");
        let mut na = sa.names();
        let mut nb = sb.names();
        na.sort();
        nb.sort();
        assert_eq!(na, nb, "{what}/{f}: tensor names");
        for n in nb {
            let (ta, tb) = (sa.tensor(n).unwrap(), sb.tensor(n).unwrap());
            assert_eq!(ta.dtype(), tb.dtype(), "{what}/{f}: {n} dtype");
            assert_eq!(ta.shape(), tb.shape(), "{what}/{f}: {n} shape");
            if ta.data() != tb.data() {
                let i = ta
                    .data()
                    .iter()
                    .zip(tb.data())
                    .position(|(x, y)| x != y)
                    .unwrap();
                panic!(
                    "{what}/{f}: {n} bytes differ first at byte {i} of {}",
                    tb.data().len()
                );
            }
            count += 1;
        }
    }
    assert!(count > 0, "{what}: no tensors compared");
    let (ia, ib) = (
        read_json(&ours.join("model.safetensors.index.json")),
        read_json(&theirs.join("model.safetensors.index.json")),
    );
    assert_eq!(ia, ib, "{what}: model.safetensors.index.json");
    let (ca, cb) = (
        read_json(&ours.join("config.json")),
        read_json(&theirs.join("config.json")),
    );
    assert_eq!(
        ca["quantization"], cb["quantization"],
        "{what}: quantization map"
    );
    assert_eq!(ca, cb, "{what}: config.json");
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(ours.join(f).is_file(), "{what}: {f} not copied");
    }
}

fn skip() -> bool {
    if rooftop_oracle::skip_requested() {
        eprintln!("ROOFTOP_SKIP_ORACLE=1: skipping");
        return true;
    }
    false
}

/// Build the tiny HF checkpoints; returns `<dir>/in`.
fn make_inputs(tmp: &TempDir) -> PathBuf {
    let input = tmp.path().join("in");
    rooftop_oracle::run("mlx_convert.py", &[Path::new("make"), &input]);
    input
}

fn run_logits(tmp: &TempDir, pairs: &[(PathBuf, PathBuf)]) -> Vec<Value> {
    let p = tmp.path().join(format!("pairs-{}.json", pairs.len()));
    std::fs::write(&p, serde_json::to_vec(&pairs).unwrap()).unwrap();
    let out = rooftop_oracle::run("mlx_convert.py", &[Path::new("logits"), &p]);
    match serde_json::from_str(out.lines().last().unwrap()).unwrap() {
        Value::Array(v) => v,
        v => panic!("unexpected oracle output {v}"),
    }
}

fn check_arch(arch: &str) {
    if skip() {
        return;
    }
    let tmp = TempDir::new(&format!("convert-{arch}"));
    let input = make_inputs(&tmp).join(arch);
    let cases = cases();
    let list: Vec<Value> = cases
        .iter()
        .map(|c| oracle_case(c, &input, &tmp.path().join("mlx").join(c.name)))
        .collect();
    let cases_path = tmp.path().join("cases.json");
    std::fs::write(&cases_path, serde_json::to_vec(&list).unwrap()).unwrap();
    rooftop_oracle::run("mlx_convert.py", &[Path::new("convert"), &cases_path]);
    let mut pairs = Vec::new();
    for c in &cases {
        let ours = tmp.path().join("rooftop").join(c.name);
        let theirs = tmp.path().join("mlx").join(c.name);
        let report = convert(&input, &ours, &options(c), &|_, _| {})
            .unwrap_or_else(|e| panic!("{arch}/{}: {e}", c.name));
        assert_same(&ours, &theirs, &format!("{arch}/{}", c.name));
        assert!(report.bits_per_weight > 0.0 && report.bytes_per_token > 0);
        pairs.push((ours, theirs));
    }
    for (r, c) in run_logits(&tmp, &pairs).iter().zip(&cases) {
        if let Some(errs) = r["errors"].as_array() {
            // MLX's CPU backend cannot run this model (e.g. unquantized bf16 experts):
            // both conversions must fail identically.
            assert!(
                errs.len() == 2 && errs[0] == errs[1],
                "{arch}/{}: {r}",
                c.name
            );
            eprintln!(
                "{arch}/{}: mlx-lm cannot run it on CPU: {}",
                c.name, errs[0]
            );
            continue;
        }
        assert_eq!(
            r["identical"],
            json!(true),
            "{arch}/{}: mlx-lm logits differ: {r}",
            c.name
        );
    }
}

#[test]
fn qwen3_moe_matches_mlx_lm_convert() {
    check_arch("qwen3_moe");
}

#[test]
fn glm4_moe_matches_mlx_lm_convert() {
    check_arch("glm4_moe");
}

#[test]
fn mixtral_matches_mlx_lm_convert() {
    check_arch("mixtral");
}

#[test]
fn llama_matches_mlx_lm_convert() {
    check_arch("llama");
}

fn quant_map(dir: &Path) -> serde_json::Map<String, Value> {
    read_json(&dir.join("config.json"))["quantization"]
        .as_object()
        .unwrap()
        .clone()
}

/// name → (dtype, shape) over every shard of a converted model.
fn tensors(dir: &Path) -> BTreeMap<String, (String, Vec<usize>)> {
    let mut out = BTreeMap::new();
    for f in shard_files(dir) {
        let b = std::fs::read(dir.join(f)).unwrap();
        let st = SafeTensors::deserialize(&b).unwrap();
        for (n, t) in st.tensors() {
            out.insert(n, (format!("{:?}", t.dtype()), t.shape().to_vec()));
        }
    }
    out
}

#[test]
fn recipe_is_applied_as_written_and_loads_in_mlx_lm() {
    if skip() {
        return;
    }
    let tmp = TempDir::new("convert-recipe");
    let input = make_inputs(&tmp).join("qwen3_moe");
    // The shipped recipe with one edge layer on each side (the tiny model has 4) and
    // embeddings kept.
    let shipped = std::fs::read_to_string(
        rooftop_oracle::workspace_root().join("recipes/edge-nvfp4-middle-affine3.toml"),
    )
    .unwrap();
    assert!(shipped.contains("first:2, last:2"));
    let text = shipped
        .replace("first:2, last:2", "first:1, last:1")
        .replace(
            "tensors = [\"embeddings\"]\nformat = { mode = \"affine\", bits = 6, group_size = 64 }",
            "tensors = [\"embeddings\"]\nformat = \"keep\"",
        );
    assert_ne!(text, shipped);
    let recipe = Recipe::parse("edge.toml", &text).unwrap();
    let ours = tmp.path().join("recipe");
    let opts = Options {
        quantize: true,
        recipe: Some(recipe),
        ..Options::default()
    };
    let report = convert(&input, &ours, &opts, &|_, _| {}).unwrap();
    let t = tensors(&ours);
    let q = quant_map(&ours);
    // qwen3_moe tiny model: 4 layers; the recipe puts layers 0 and 3 (first:1, last:1)
    // in nvfp4, keeps routers and embeddings, lm_head 6-bit, the rest affine 3-bit g64.
    let nvfp4 = json!({"group_size": 16, "bits": 4, "mode": "nvfp4"});
    let a6 = json!({"group_size": 64, "bits": 6, "mode": "affine"});
    for l in 0..4 {
        let edge = l == 0 || l == 3;
        for m in ["self_attn.q_proj", "self_attn.o_proj"] {
            let path = format!("model.layers.{l}.{m}");
            let (dt, shape) = &t[&format!("{path}.scales")];
            if edge {
                assert_eq!(q[&path], nvfp4, "{path}");
                assert_eq!(dt, "U8", "{path}");
                assert!(!t.contains_key(&format!("{path}.biases")));
            } else {
                assert!(!q.contains_key(&path), "{path} should use the default");
                assert_eq!(dt, "BF16");
                // q_proj reads hidden (128), o_proj heads × head_dim (4 × 32).
                let cols = 128;
                assert_eq!(shape[1], cols / 64, "{path}");
                assert_eq!(t[&format!("{path}.weight")].1[1], cols * 3 / 32, "{path}");
            }
        }
        if l < 3 {
            let router = format!("model.layers.{l}.mlp.gate");
            assert_eq!(q[&router], json!(false), "{router}");
            assert!(!t.contains_key(&format!("{router}.scales")));
            assert_eq!(t[&format!("{router}.weight")].0, "BF16");
            let up = format!("model.layers.{l}.mlp.switch_mlp.up_proj");
            assert_eq!(
                t[&format!("{up}.weight")].1,
                vec![8, 64, if edge { 16 } else { 12 }]
            );
        }
    }
    assert_eq!(q["model.embed_tokens"], json!(false));
    assert!(!t.contains_key("model.embed_tokens.scales"));
    assert_eq!(q["lm_head"], a6);
    assert_eq!(q["group_size"], json!(64));
    assert_eq!(q["bits"], json!(3));
    assert!(report.bits_per_weight > 3.0 && report.bits_per_weight < 8.0);

    // mlx-lm loads it and builds exactly the layers the recipe asked for.
    let out = rooftop_oracle::run("mlx_convert.py", &[Path::new("describe"), &ours]);
    let d: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(d["finite"], json!(true), "non-finite logits");
    let mods = d["modules"].as_object().unwrap();
    assert!(mods.len() > 30, "{d}");
    let a3 = json!({"group_size": 64, "bits": 3, "mode": "affine"});
    for (path, got) in mods {
        let layer = path
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|l| l.parse::<usize>().ok());
        let want = if path.contains("norm")
            || path.ends_with("mlp.gate")
            || path == "model.embed_tokens"
        {
            json!("dense")
        } else if path == "lm_head" {
            a6.clone()
        } else if matches!(layer, Some(0 | 3)) {
            nvfp4.clone()
        } else {
            a3.clone()
        };
        assert_eq!(got, &want, "mlx-lm built {path} as {got}");
    }
}

#[test]
fn optimized_quantizer_keeps_the_format_and_lowers_the_error() {
    if skip() {
        return;
    }
    let tmp = TempDir::new("convert-opt");
    let input = make_inputs(&tmp).join("mixtral");
    let formats = [
        (3, QuantMode::Affine),
        (4, QuantMode::Nvfp4),
        (4, QuantMode::Mxfp4),
    ];
    for (i, (bits, mode)) in formats.into_iter().enumerate() {
        let base = Options {
            quantize: true,
            mode,
            bits: Some(bits),
            ..Options::default()
        };
        let a = tmp.path().join(format!("mlx{i}"));
        let b = tmp.path().join(format!("opt{i}"));
        let ra = convert(&input, &a, &base, &|_, _| {}).unwrap();
        let rb = convert(
            &input,
            &b,
            &Options {
                method: Method::Optimized,
                ..base
            },
            &|_, _| {},
        )
        .unwrap();
        assert_eq!(tensors(&a), tensors(&b), "{mode}: formats differ");
        assert_eq!(quant_map(&a), quant_map(&b));
        for (ka, kb) in ra.per_kind.iter().zip(&rb.per_kind) {
            if ka.rmse > 0.0 {
                assert!(
                    kb.rmse < ka.rmse,
                    "{mode} {}: optimized rmse {} >= {}",
                    ka.name,
                    kb.rmse,
                    ka.rmse
                );
            }
        }
        let r = &run_logits(&tmp, &[(b.clone(), a.clone())])[0];
        assert!(r["max_abs_diff"].as_f64().unwrap().is_finite(), "{r}");
    }
}

fn recipe_err(input: &Path, text: &str) -> String {
    let recipe = match Recipe::parse("test.toml", text) {
        Ok(r) => r,
        Err(e) => return e.to_string(),
    };
    let out = input.with_file_name("never");
    let opts = Options {
        quantize: true,
        recipe: Some(recipe),
        ..Options::default()
    };
    let e = convert(input, &out, &opts, &|_, _| {}).expect_err("bad recipe accepted");
    assert!(matches!(e, ConvertError::Recipe { .. }), "{e:?}");
    assert!(!out.exists(), "output written despite a bad recipe");
    let partial = std::fs::read_dir(input.parent().unwrap()).unwrap().count();
    assert!(partial > 0);
    e.to_string()
}

#[test]
fn bad_recipes_fail_before_any_work() {
    if skip() {
        return;
    }
    let tmp = TempDir::new("convert-badrecipe");
    let input = make_inputs(&tmp).join("qwen3_moe");
    let e = recipe_err(
        &input,
        "[[rule]]\ntensors = [\"experts\"]\nformat = \"q5_k\"\n",
    );
    assert!(
        e.contains("unknown format \"q5_k\"") && e.contains("rule #1"),
        "{e}"
    );
    let e = recipe_err(&input, "default = { mode = \"int4\" }\n");
    assert!(e.contains("unknown format"), "{e}");
    // Expert down_proj has input dimension 64: group 128 does not divide it.
    let e = recipe_err(
        &input,
        "[[rule]]\ntensors = [\"attention\"]\nformat = \"nvfp4\"\n\
         [[rule]]\ntensors = [\"experts\"]\nformat = { mode = \"affine\", bits = 4, group_size = 128 }\n",
    );
    assert!(
        e.contains("rule #2") && e.contains("does not divide") && e.contains("down_proj"),
        "{e}"
    );
    let e = recipe_err(
        &input,
        "[[rule]]\ntensors = [\"shared_expert\"]\nformat = \"nvfp4\"\n",
    );
    assert!(e.contains("matches no quantizable tensor"), "{e}");
    let e = recipe_err(&input, "[[rule]]\npattern = \"*.w1\"\nformat = \"keep\"\n");
    assert!(e.contains("matches no quantizable tensor"), "{e}");
    let e = recipe_err(&input, "[[rule]]\nlayers = \"9-12\"\nformat = \"keep\"\n");
    assert!(e.contains("matches no quantizable tensor"), "{e}");
    let e = recipe_err(&input, "[[rule]]\ntensors = [\"mlp\"]\nformat = \"keep\"\n");
    assert!(e.contains("unknown tensor kind \"mlp\""), "{e}");
    let e = recipe_err(&input, "[[rule]]\nlayer = \"1\"\nformat = \"keep\"\n");
    assert!(e.contains("unknown field"), "{e}");
    let e = recipe_err(&input, "[[rule]]\nlayers = \"x-2\"\nformat = \"keep\"\n");
    assert!(e.contains("bad layer selector"), "{e}");
    let e = recipe_err(
        &input,
        "[[rule]]\nformat = { mode = \"nvfp4\", group_size = 32 }\n",
    );
    assert!(e.contains("nvfp4 requires"), "{e}");
}

#[test]
fn bad_inputs_are_clear_errors() {
    if skip() {
        return;
    }
    let tmp = TempDir::new("convert-badinput");
    let root = make_inputs(&tmp);
    let good = root.join("llama");
    let q = Options {
        quantize: true,
        ..Options::default()
    };
    let run = |dir: &Path| {
        let out = tmp.path().join("out-never");
        let e = convert(dir, &out, &q, &|_, _| {}).expect_err("bad input accepted");
        assert!(!out.exists());
        e
    };
    let copy = |name: &str| {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(&good).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        d
    };
    // No such directory / no config.
    let e = run(&tmp.path().join("nope"));
    assert!(
        matches!(e, ConvertError::Io { .. }) && e.to_string().contains("config.json"),
        "{e}"
    );
    // No weights.
    let d = copy("noweights");
    for f in shard_files(&d) {
        std::fs::remove_file(d.join(f)).unwrap();
    }
    assert!(matches!(run(&d), ConvertError::NoWeights(_)));
    // Truncated safetensors.
    let d = copy("corrupt");
    let f = d.join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = run(&d);
    assert!(
        matches!(e, ConvertError::Safetensors { .. })
            && e.to_string().contains("model-00002-of-00002"),
        "{e}"
    );
    // Garbage header.
    std::fs::write(&f, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all").unwrap();
    assert!(matches!(run(&d), ConvertError::Safetensors { .. }));
    // Unknown model_type.
    let d = copy("unknown");
    let mut cfg = read_json(&d.join("config.json"));
    cfg["model_type"] = json!("mamba9");
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    let e = run(&d);
    assert!(
        e.to_string().contains("mamba9") && e.to_string().contains("qwen3_moe"),
        "{e}"
    );
    // Broken config.json.
    std::fs::write(d.join("config.json"), "{\"model_type\": ").unwrap();
    assert!(matches!(run(&d), ConvertError::Json { .. }));
    // A missing expert.
    let moe = root.join("qwen3_moe");
    let d = tmp.path().join("noexpert");
    std::fs::create_dir_all(&d).unwrap();
    for e in std::fs::read_dir(&moe).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
    }
    let mut cfg = read_json(&d.join("config.json"));
    cfg["num_experts"] = json!(9);
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    let e = run(&d);
    assert!(e.to_string().contains("experts.8"), "{e}");
    // A NaN found mid-run: the run fails naming the tensor and leaves neither the
    // output nor its partial directory behind.
    let d = copy("nan");
    let f = d.join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    let victim = owned
        .iter_mut()
        .find(|t| t.0.ends_with("mlp.up_proj.weight"))
        .unwrap();
    victim.3[200..202].copy_from_slice(&half::bf16::NAN.to_bits().to_le_bytes());
    let victim_name = victim.0.clone();
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, dt, sh, data)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, sh.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &f).unwrap();
    let out = tmp.path().join("nan-out");
    let e = convert(&d, &out, &q, &|_, _| {}).unwrap_err();
    assert!(
        matches!(e, ConvertError::Quant { .. }) && e.to_string().contains(&victim_name),
        "{e}"
    );
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "partial output left behind");
    // Existing output.
    let e = convert(&good, &good, &q, &|_, _| {}).unwrap_err();
    assert!(matches!(e, ConvertError::OutputExists(_)));
    // mlx-lm's own rule: predicates only with affine.
    let e = convert(
        &good,
        &tmp.path().join("x"),
        &Options {
            quant_predicate: Some(Mixed::M3_6),
            mode: QuantMode::Nvfp4,
            ..q.clone()
        },
        &|_, _| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("affine"), "{e}");
}
