//! The two real GGUF models from PyPI (scripts/fetch-models): SmolLM2-135M-Instruct
//! (Q4_1, gpt2/smollm BPE) and Gemma 3 270M (Q4_K_M: Q4_K, Q5_0, Q6_K, Q8_0; SentencePiece).
//! Checked against gguf-py (dequantization) and recorded llama.cpp output (tokenizer,
//! tests/oracle/golden, made by tests/oracle/llamacpp_golden.py).

use rooftop_gguf::{tokenizer, GgmlType, GgufFile};
use rooftop_oracle::{workspace_root, TempDir};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const GEMMA3: &str = "gemma-3-270m-q4_k_m.gguf";

/// Fetch the models once per test binary (idempotent; a no-op when cached).
fn models() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = Command::new(workspace_root().join("scripts/fetch-models"))
            .output()
            .expect("run scripts/fetch-models");
        assert!(
            out.status.success(),
            "scripts/fetch-models failed (models come from PyPI):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn real_files_parse_with_expected_layout() {
    if rooftop_oracle::skip_requested() {
        return;
    }
    let smol = GgufFile::open(models().join(SMOLLM2)).unwrap();
    assert_eq!(smol.version, 3);
    assert_eq!(smol.tensors.len(), 272);
    assert_eq!(smol.metadata.str("general.architecture").unwrap(), "llama");
    assert_eq!(smol.metadata.usize("llama.block_count").unwrap(), 30);
    let q = smol.matrix("blk.0.attn_q.weight").unwrap();
    assert_eq!((q.ty, q.rows, q.cols), (GgmlType::Q4_1, 576, 576));
    let e = smol.matrix("token_embd.weight").unwrap();
    assert_eq!((e.ty, e.rows, e.cols), (GgmlType::Q8_0, 49152, 576));

    let gemma = GgufFile::open(models().join(GEMMA3)).unwrap();
    assert_eq!(gemma.tensors.len(), 236);
    assert_eq!(
        gemma.metadata.str("general.architecture").unwrap(),
        "gemma3"
    );
    assert_eq!(
        gemma
            .metadata
            .usize("gemma3.attention.sliding_window")
            .unwrap(),
        512
    );
    let d = gemma.matrix("blk.0.ffn_down.weight").unwrap();
    assert_eq!((d.ty, d.rows, d.cols), (GgmlType::Q6_K, 640, 2048));
}

#[test]
fn real_tensors_dequantize_like_gguf_py() {
    if rooftop_oracle::skip_requested() {
        return;
    }
    let cases: [(&str, &[&str]); 2] = [
        (
            SMOLLM2,
            &[
                "blk.0.ffn_gate.weight",
                "blk.29.attn_v.weight",
                "blk.0.attn_norm.weight",
            ],
        ),
        (
            GEMMA3,
            &[
                "blk.0.attn_output.weight", // Q4_K
                "blk.0.ffn_down.weight",    // Q6_K
                "blk.0.attn_q.weight",      // Q5_0
                "blk.0.attn_v.weight",      // Q8_0
                "blk.3.attn_q_norm.weight", // F32
            ],
        ),
    ];
    for (file, names) in cases {
        let path = models().join(file);
        let dir = TempDir::new("gguf-real");
        let mut args: Vec<&Path> = vec![Path::new("dequant"), &path, dir.path()];
        args.extend(names.iter().map(Path::new));
        rooftop_oracle::run("gguf_dequant.py", &args);
        let g = GgufFile::open(&path).unwrap();
        for name in names {
            let ours = g.tensor_f32(name).unwrap();
            let theirs = read_f32(&dir.path().join(format!("{name}.f32")));
            assert_eq!(ours.len(), theirs.len(), "{file} {name}");
            let same = ours
                .iter()
                .zip(&theirs)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{file} {name}: differs from gguf-py");
        }
    }
}

fn golden(name: &str) -> String {
    let p = workspace_root().join("tests/oracle/golden").join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Prompts are JSON strings, one per line; only `\n`, `\t`, `\r`, `\"`, `\\` and
/// `\uXXXX` escapes occur (written by Python's json.dumps with ensure_ascii=False).
fn json_string(s: &str) -> String {
    let s = s
        .trim()
        .strip_prefix('"')
        .unwrap()
        .strip_suffix('"')
        .unwrap();
    let mut out = String::new();
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next().unwrap() {
            'n' => out.push('\n'),
            't' => out.push('\t'),
            'r' => out.push('\r'),
            'u' => {
                let hex: String = it.by_ref().take(4).collect();
                out.push(char::from_u32(u32::from_str_radix(&hex, 16).unwrap()).unwrap());
            }
            c => out.push(c),
        }
    }
    out
}

fn check_tokenizer(file: &str, golden_name: &str) {
    let g = GgufFile::open(models().join(file)).unwrap();
    let tk = tokenizer::from_metadata(&g.metadata).unwrap();
    let prompts: Vec<String> = golden("tokenizer_prompts.txt")
        .lines()
        .map(json_string)
        .collect();
    let expected: Vec<Vec<u32>> = golden(golden_name)
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(prompts.len(), expected.len());
    let mut bad = Vec::new();
    for (p, want) in prompts.iter().zip(&expected) {
        let got = tk.encode(p).unwrap();
        if &got != want {
            bad.push(format!("{p:?}\n  ours      {got:?}\n  llama.cpp {want:?}"));
        }
    }
    assert!(
        bad.is_empty(),
        "{file}: {} prompts differ:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn smollm2_tokenizer_matches_llama_cpp() {
    if rooftop_oracle::skip_requested() {
        return;
    }
    check_tokenizer(SMOLLM2, "smollm2.tokens.txt");
}

#[test]
fn gemma3_tokenizer_matches_llama_cpp() {
    if rooftop_oracle::skip_requested() {
        return;
    }
    check_tokenizer(GEMMA3, "gemma3.tokens.txt");
}

#[test]
fn tokenizers_round_trip_and_know_their_special_tokens() {
    if rooftop_oracle::skip_requested() {
        return;
    }
    let smol = GgufFile::open(models().join(SMOLLM2)).unwrap();
    let tk = tokenizer::from_metadata(&smol.metadata).unwrap();
    assert!(!tk.add_bos);
    assert!(tk
        .chat_template
        .as_deref()
        .unwrap()
        .contains("<|im_start|>"));
    let im_end = tk.tokenizer.token_to_id("<|im_end|>").unwrap();
    assert!(tk.eog.contains(&im_end), "eog {:?}", tk.eog);
    let text = "Grüße 🙂 — 42 apples\n\tend";
    assert_eq!(tk.decode(&tk.encode(text).unwrap()).unwrap(), text);

    let gemma = GgufFile::open(models().join(GEMMA3)).unwrap();
    let tk = tokenizer::from_metadata(&gemma.metadata).unwrap();
    assert!(tk.add_bos);
    assert_eq!(tk.bos, Some(2));
    let eot = tk.tokenizer.token_to_id("<end_of_turn>").unwrap();
    assert!(
        tk.eog.contains(&eot) && tk.eog.contains(&1),
        "eog {:?}",
        tk.eog
    );
    let ids = tk.encode(text).unwrap();
    assert_eq!(ids[0], 2);
    assert_eq!(tk.decode(&ids[1..]).unwrap(), text);
}

#[test]
fn hyper_parameters_of_real_models() {
    if rooftop_oracle::skip_requested() {
        return;
    }
    use rooftop_gguf::arch::{Activation, Arch, RopeStyle};
    use rooftop_gguf::Hparams;
    let smol = Hparams::from_file(&GgufFile::open(models().join(SMOLLM2)).unwrap()).unwrap();
    assert_eq!(smol.arch, Arch::Llama);
    assert_eq!((smol.layers, smol.embd, smol.ff), (30, 576, 1536));
    assert_eq!((smol.heads, smol.kv_heads, smol.head_dim), (9, 3, 64));
    assert_eq!((smol.vocab, smol.rope_base), (49152, 100000.0));
    assert_eq!(smol.rope_style, RopeStyle::Interleaved);
    assert!(smol.tied_embeddings && !smol.qk_norm && smol.sliding_window.is_none());

    let gemma = Hparams::from_file(&GgufFile::open(models().join(GEMMA3)).unwrap()).unwrap();
    assert_eq!(gemma.arch, Arch::Gemma3);
    assert_eq!((gemma.layers, gemma.embd, gemma.ff), (18, 640, 2048));
    assert_eq!((gemma.heads, gemma.kv_heads, gemma.head_dim), (4, 1, 256));
    assert_eq!(gemma.vocab, 262144);
    assert_eq!(gemma.activation, Activation::GeluTanh);
    assert_eq!(gemma.sliding_window, Some(512));
    assert!(gemma.qk_norm && gemma.sandwich_norms && gemma.tied_embeddings);
    assert_eq!(gemma.embed_scale, Some(640f32.sqrt()));
    // Layers 5, 11, 17 are global; the rest slide.
    let global: Vec<usize> = (0..18).filter(|&l| !gemma.is_local(l)).collect();
    assert_eq!(global, [5, 11, 17]);
}
