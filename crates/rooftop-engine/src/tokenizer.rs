//! `tokenizer.json` via the `tokenizers` crate, plus what `tokenizer_config.json`,
//! `config.json` and `generation_config.json` say about chat formatting and EOS.

use crate::{EngineError, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_ids: Vec<u32>,
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|err| EngineError::Io {
        path: path.into(),
        err,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|err| EngineError::Json {
            path: path.into(),
            err,
        })
}

/// A special token given as `"<s>"` or `{"content": "<s>", ...}`.
fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

impl Tokenizer {
    /// Load from a model directory.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| EngineError::Tokenizer {
                path: path.clone(),
                msg: e.to_string(),
            })?;
        let tc = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let mut chat_template = match tc.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(Value::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or(a.first())
                .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
            _ => None,
        };
        let jinja = dir.join("chat_template.jinja");
        if chat_template.is_none() && jinja.exists() {
            chat_template = Some(
                std::fs::read_to_string(&jinja)
                    .map_err(|err| EngineError::Io { path: jinja, err })?,
            );
        }
        let bos_token = token_str(tc.get("bos_token"));
        let eos_token = token_str(tc.get("eos_token"));
        let mut eos_ids = vec![];
        for f in ["generation_config.json", "config.json"] {
            if let Some(v) = read_json(&dir.join(f))? {
                eos_ids.extend(crate::config::ids(v.get("eos_token_id")));
            }
        }
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            eos_ids.push(id);
        }
        eos_ids.sort();
        eos_ids.dedup();
        Ok(Self {
            inner,
            path,
            chat_template,
            bos_token,
            eos_token,
            eos_ids,
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> EngineError {
        EngineError::Tokenizer {
            path: self.path.clone(),
            msg: e.to_string(),
        }
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| self.err(e))?
            .get_ids()
            .to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.err(e))
    }

    /// Incremental decoding (the `tokenizers` crate's `DecodeStream`): feed ids one
    /// at a time, get text once it forms complete UTF-8.
    pub fn stream(&self) -> TextStream<'_> {
        TextStream {
            inner: self.inner.decode_stream(false),
            tok: self,
        }
    }

    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Render the chat template (minijinja with Python string-method compatibility)
    /// for `(role, content)` messages.
    pub fn apply_chat_template(
        &self,
        messages: &[(&str, &str)],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tpl = self.chat_template.as_deref().ok_or_else(|| {
            EngineError::Template("tokenizer_config.json has no chat_template".into())
        })?;
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", tpl)
            .map_err(|e| EngineError::Template(e.to_string()))?;
        let msgs: Vec<Value> = messages
            .iter()
            .map(|(r, c)| serde_json::json!({"role": r, "content": c}))
            .collect();
        env.get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => msgs,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => self.bos_token.clone().unwrap_or_default(),
                    eos_token => self.eos_token.clone().unwrap_or_default(),
                })
            })
            .map_err(|e| EngineError::Template(format!("{e:#}")))
    }
}

type Stream<'a> = tokenizers::DecodeStream<
    'a,
    tokenizers::ModelWrapper,
    tokenizers::NormalizerWrapper,
    tokenizers::PreTokenizerWrapper,
    tokenizers::PostProcessorWrapper,
    tokenizers::DecoderWrapper,
>;

/// Text of a growing token sequence.
pub struct TextStream<'a> {
    inner: Stream<'a>,
    tok: &'a Tokenizer,
}

impl TextStream<'_> {
    /// The new text this token completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        Ok(self
            .inner
            .step(id)
            .map_err(|e| self.tok.err(e))?
            .unwrap_or_default())
    }
}
