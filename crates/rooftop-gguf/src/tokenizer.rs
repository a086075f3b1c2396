//! The tokenizer and chat template of a GGUF file, rebuilt as a `tokenizers::Tokenizer`
//! from `tokenizer.ggml.*` metadata so a lone `.gguf` needs no `tokenizer.json`.
//!
//! - `gpt2` (byte-level BPE): tokens + merges; the pre-tokenizer regex is chosen by
//!   `tokenizer.ggml.pre` exactly as llama.cpp's `llama-vocab.cpp` does.
//! - `llama` (SentencePiece BPE): tokens + scores. SentencePiece merges the adjacent
//!   pair whose concatenation has the highest score; a BPE whose merge ranks follow
//!   those scores is the same algorithm, so the merges are derived from the scores.
//!   Unknown characters fall back to `<0xXX>` byte tokens.
//!
//! Control tokens become special added tokens and user-defined ones plain added tokens,
//! so both are matched whole in input text (llama.cpp's `parse_special = true`).

use crate::{GgufError, Metadata, Result};
use std::collections::HashMap;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// `tokenizer.ggml.token_type` values (llama.cpp `llama_token_type`).
pub mod token_type {
    pub const NORMAL: i64 = 1;
    pub const UNKNOWN: i64 = 2;
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;
    pub const UNUSED: i64 = 5;
    pub const BYTE: i64 = 6;
}

/// A GGUF file's tokenizer with the ids generation needs.
pub struct GgufTokenizer {
    pub tokenizer: Tokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Tokens that end generation: eos, eot, and control tokens llama.cpp treats as
    /// end-of-generation by their text (`<end_of_turn>`, `<|im_end|>`, ...).
    pub eog: Vec<u32>,
    /// Prepend bos when encoding a prompt (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
    /// Jinja chat template (`tokenizer.chat_template`), if the file has one.
    pub chat_template: Option<String>,
}

impl GgufTokenizer {
    /// Prompt text to ids, with bos when the model wants it and special tokens parsed.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, self.add_bos)
            .map_err(|e| GgufError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }
    /// Ids back to text (special tokens kept, as llama.cpp's detokenizer does).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| GgufError::Tokenizer(e.to_string()))
    }
}

/// Texts llama.cpp marks end-of-generation when present as control tokens.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|eom_id|>",
    "<EOT>",
    "<|return|>",
    "<|call|>",
];

/// Builds the tokenizer described by `md`.
pub fn from_metadata(md: &Metadata) -> Result<GgufTokenizer> {
    let model = md.str("tokenizer.ggml.model")?;
    let tokens = md.strings("tokenizer.ggml.tokens")?;
    let types = match md.get("tokenizer.ggml.token_type") {
        Some(_) => md.i64s("tokenizer.ggml.token_type")?,
        None => vec![token_type::NORMAL; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(GgufError::Tokenizer(format!(
            "{} token types for {} tokens",
            types.len(),
            tokens.len()
        )));
    }
    let id = |key: &str| -> Result<Option<u32>> {
        match md.get(key) {
            None => Ok(None),
            Some(_) => {
                let v = md.u64(key)?;
                if v as usize >= tokens.len() {
                    return Err(GgufError::Tokenizer(format!(
                        "{key} = {v} is outside the vocabulary of {}",
                        tokens.len()
                    )));
                }
                Ok(Some(v as u32))
            }
        }
    };
    let bos = id("tokenizer.ggml.bos_token_id")?;
    let eos = id("tokenizer.ggml.eos_token_id")?;
    let unk = id("tokenizer.ggml.unknown_token_id")?;
    let flag = |key: &str, default: bool| md.get(key).and_then(|v| v.as_bool()).unwrap_or(default);
    let add_space_prefix = flag("tokenizer.ggml.add_space_prefix", model == "llama");
    // SentencePiece models add bos unless told otherwise; BPE ones do not.
    let add_bos = flag("tokenizer.ggml.add_bos_token", model == "llama") && bos.is_some();

    // First occurrence wins, as in llama.cpp's token_to_id map.
    let mut vocab: HashMap<String, u32> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        vocab.entry(t.to_string()).or_insert(i as u32);
    }

    let mut tk = match model {
        "gpt2" => {
            let merges = md
                .strings("tokenizer.ggml.merges")?
                .iter()
                .map(|m| {
                    m.split_once(' ')
                        .map(|(a, b)| (a.to_string(), b.to_string()))
                        .ok_or_else(|| GgufError::Tokenizer(format!("merge {m:?} has no space")))
                })
                .collect::<Result<Vec<_>>>()?;
            let bpe = BPE::builder()
                .vocab_and_merges(
                    vocab
                        .into_iter()
                        .collect::<tokenizers::models::bpe::Vocab>(),
                    merges,
                )
                .build()
                .map_err(tok_err)?;
            let mut tk = Tokenizer::new(bpe);
            let pre = md
                .get("tokenizer.ggml.pre")
                .and_then(|v| v.as_str())
                .unwrap_or("default");
            tk.with_pre_tokenizer(Some(byte_level_pre(pre)?));
            tk.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
            tk
        }
        "llama" => {
            let scores = md.f32s("tokenizer.ggml.scores")?;
            if scores.len() != tokens.len() {
                return Err(GgufError::Tokenizer(format!(
                    "{} scores for {} tokens",
                    scores.len(),
                    tokens.len()
                )));
            }
            let merges = merges_from_scores(&tokens, &scores, &vocab);
            let mut b = BPE::builder()
                .vocab_and_merges(
                    vocab
                        .into_iter()
                        .collect::<tokenizers::models::bpe::Vocab>(),
                    merges,
                )
                .byte_fallback(true);
            if let Some(u) = unk {
                b = b.unk_token(tokens[u as usize].to_string());
            }
            let mut tk = Tokenizer::new(b.build().map_err(tok_err)?);
            let space = Replace::new(" ", "▁").map_err(tok_err)?;
            let norm: NormalizerWrapper = if add_space_prefix {
                tokenizers::normalizers::Sequence::new(vec![
                    Prepend::new("▁".into()).into(),
                    space.into(),
                ])
                .into()
            } else {
                space.into()
            };
            tk.with_normalizer(Some(norm));
            let mut dec: Vec<DecoderWrapper> = vec![
                Replace::new("▁", " ").map_err(tok_err)?.into(),
                ByteFallback::default().into(),
                Fuse::default().into(),
            ];
            if add_space_prefix {
                dec.push(Strip::new(' ', 1, 0).into());
            }
            tk.with_decoder(Some(DecoderSequence::new(dec)));
            tk
        }
        other => {
            return Err(GgufError::Tokenizer(format!(
                "tokenizer.ggml.model {other:?} is not supported (gpt2, llama are)"
            )))
        }
    };

    let mut special = Vec::new();
    let mut user = Vec::new();
    let mut eog: Vec<u32> = Vec::new();
    for (i, (t, &ty)) in tokens.iter().zip(&types).enumerate() {
        match ty {
            token_type::CONTROL => {
                special.push(AddedToken::from(t.to_string(), true));
                if EOG_TEXTS.contains(t) {
                    eog.push(i as u32);
                }
            }
            token_type::USER_DEFINED => {
                user.push(AddedToken::from(t.to_string(), false).normalized(false))
            }
            _ => {}
        }
    }
    tk.add_special_tokens(&special);
    tk.add_tokens(&user);

    for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        eog.extend(id(key)?);
    }
    eog.extend(eos);
    eog.sort_unstable();
    eog.dedup();

    if add_bos {
        let b = bos.expect("add_bos implies bos");
        let name = tokens[b as usize].to_string();
        let tp = TemplateProcessing::builder()
            .try_single(vec![name.clone(), "$A".into()])
            .map_err(tok_err)?
            .try_pair(vec![name.clone(), "$A".into(), "$B".into()])
            .map_err(tok_err)?
            .special_tokens(vec![(name, b)])
            .build()
            .map_err(tok_err)?;
        tk.with_post_processor(Some(tp));
    }

    Ok(GgufTokenizer {
        tokenizer: tk,
        bos,
        eos,
        eog,
        add_bos,
        chat_template: md
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_string),
    })
}

fn tok_err(e: impl std::fmt::Display) -> GgufError {
    GgufError::Tokenizer(e.to_string())
}

/// GPT-2 style regexes by `tokenizer.ggml.pre`, from llama.cpp's `llama-vocab.cpp`.
const GPT2_RE: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level_pre(pre: &str) -> Result<PreTokenizerWrapper> {
    let regexes: &[&str] = match pre {
        "default" | "gpt2" | "gpt-2" => &[GPT2_RE],
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => &[LLAMA3_RE],
        "qwen2" | "qwen3" | "deepseek-r1-qwen" | "qwen35" | "megrez" => &[QWEN2_RE],
        "smollm" => &[r"\p{N}", GPT2_RE],
        other => {
            return Err(GgufError::Tokenizer(format!(
                "tokenizer.ggml.pre {other:?} is not supported \
                 (default, gpt2, llama3, llama-bpe, qwen2, deepseek-r1-qwen, smollm are)"
            )))
        }
    };
    let mut seq: Vec<PreTokenizerWrapper> = Vec::new();
    for re in regexes {
        let split = Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(tok_err)?;
        seq.push(split.into());
    }
    // The regexes above already split; byte-level only maps bytes to its alphabet.
    seq.push(ByteLevel::new(false, false, false).into());
    Ok(PreSequence::new(seq).into())
}

/// SentencePiece-BPE merges: every way to split a token into two vocabulary tokens,
/// ranked by the merged token's score (highest first, then lower id).
fn merges_from_scores(
    tokens: &[&str],
    scores: &[f32],
    vocab: &HashMap<String, u32>,
) -> Vec<(String, String)> {
    let mut ranked: Vec<(f32, u32, usize, usize)> = Vec::new(); // (score, id, token, split)
    for (id, t) in tokens.iter().enumerate() {
        if vocab.get(*t) != Some(&(id as u32)) {
            continue;
        }
        for (split, _) in t.char_indices().skip(1) {
            let (a, b) = t.split_at(split);
            if vocab.contains_key(a) && vocab.contains_key(b) {
                ranked.push((scores[id], id as u32, id, split));
            }
        }
    }
    ranked.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.3.cmp(&y.3)));
    ranked
        .into_iter()
        .map(|(_, _, id, split)| {
            let (a, b) = tokens[id].split_at(split);
            (a.to_string(), b.to_string())
        })
        .collect()
}
