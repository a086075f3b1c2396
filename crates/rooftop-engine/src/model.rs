//! The decoder every supported architecture is an instance of, the KV cache, and
//! the [`Model`] handle that owns the memory-mapped weights.

use crate::layers::attention::KvCache;
use crate::layers::{Attention, Embedding, Linear, Mlp, Moe, RmsNorm};
use crate::store::{Loader, QuantConfig, Store};
use crate::{Config, EngineError, Result};
use std::path::Path;
use std::sync::Arc;

/// The token mixer of a layer. MLA (deepseek_v3 / glm_moe_dsa) becomes a second variant.
pub enum Mixer {
    Gqa(Attention),
}

/// The feed-forward of a layer. (One per layer, built once: variant size is irrelevant.)
#[allow(clippy::large_enum_variant)]
pub enum Ffn {
    Dense(Mlp),
    Moe(Moe),
}

/// Pre-norm residual block: `h += mixer(norm(h)); h += ffn(norm(h))`.
pub struct Block {
    pub input_norm: RmsNorm,
    pub mixer: Mixer,
    pub post_norm: RmsNorm,
    pub ffn: Ffn,
    /// Gemma's sandwich norms on the mixer's and the ffn's outputs (before the residual).
    pub post_mixer_norm: Option<RmsNorm>,
    pub post_ffn_norm: Option<RmsNorm>,
}

/// Embedding → blocks → final norm → lm_head (or the tied embedding).
pub struct Transformer {
    pub embed: Embedding,
    pub blocks: Vec<Block>,
    pub norm: RmsNorm,
    /// `None` = tied to the embedding.
    pub lm_head: Option<Linear>,
    /// Embeddings are multiplied by this (gemma: √hidden).
    pub embed_scale: Option<f32>,
}

/// Reusable activations, grown to the largest step seen and never shrunk, so decode
/// allocates nothing per token.
#[derive(Default)]
pub struct Scratch {
    pub h: Vec<f32>,
    pub xn: Vec<f32>,
    pub y: Vec<f32>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub att: Vec<f32>,
    pub g: Vec<f32>,
    pub u: Vec<f32>,
    pub xe: Vec<f32>,
    pub ye: Vec<f32>,
    pub shared: Vec<f32>,
    pub router: Vec<f32>,
    pub route: Vec<(u32, u32, f32)>,
    pub rtmp: Vec<(f32, usize)>,
    pub sel: Vec<(usize, f32)>,
}

/// Largest per-token widths of each scratch buffer.
#[derive(Clone, Copy, Default)]
struct Widths {
    hidden: usize,
    q: usize,
    kv: usize,
    inter: usize,
    experts: usize,
}

fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

impl Scratch {
    fn ensure(&mut self, t: usize, w: Widths) {
        for b in [
            &mut self.h,
            &mut self.xn,
            &mut self.y,
            &mut self.xe,
            &mut self.ye,
            &mut self.shared,
        ] {
            grow(b, t * w.hidden);
        }
        grow(&mut self.q, t * w.q);
        grow(&mut self.att, t * w.q);
        grow(&mut self.k, t * w.kv);
        grow(&mut self.v, t * w.kv);
        grow(&mut self.g, t * w.inter);
        grow(&mut self.u, t * w.inter);
        grow(&mut self.router, t * w.experts);
    }
}

/// One layer's cache; its layout belongs to the mixer (MLA will cache its latent).
pub enum LayerCache {
    Kv(KvCache),
}

/// KV cache for every layer, sized for `max_seq` tokens up front.
pub struct Cache {
    layers: Vec<LayerCache>,
    max_seq: usize,
    len: usize,
    scratch: Scratch,
}

impl Cache {
    /// Tokens already in the cache (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.max_seq
    }
    /// Forget everything (keeps the allocation).
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

/// Which positions' logits a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's `[V]` (generation).
    Last,
    /// Every token's `[T, V]` (scoring, `--dump-logits`).
    All,
}

/// A loaded model: architecture + memory-mapped weights.
pub struct Model {
    // Field order matters: `lanes` names `net`'s weights by address and is
    // unregistered first; `net` borrows `store`'s maps and must drop before it.
    /// The CPU kernels' packed copies (rows in lanes, `rooftop_cpu::lanes`) of the
    /// affine 4-bit matmul weights, made on the first CPU forward (a model only
    /// uploaded to a GPU never pays for them). The mapped natural bytes stay for
    /// embedding rows and the GPU upload; the CPU matmuls no longer touch them, so
    /// the OS may drop those file pages.
    lanes: std::sync::OnceLock<rooftop_cpu::lanes::Registered>,
    net: Transformer,
    widths: Widths,
    config: Config,
    store: Arc<Store>,
}

impl Model {
    /// Load `dir` (config.json + safetensors shards) or a lone `.gguf` file. Weights stay
    /// memory-mapped.
    pub fn load(dir: &Path) -> Result<Self> {
        if dir.extension().is_some_and(|e| e == "gguf") {
            let src = crate::gguf::GgufSource::open(dir)?;
            return Self::from_store(src.config()?, Store::from_gguf(src));
        }
        let config = Config::load(&dir.join("config.json"))?;
        Self::from_store(config, Store::open(dir)?)
    }

    fn from_store(config: Config, store: Store) -> Result<Self> {
        let store = Arc::new(store);
        let loader = Loader {
            store: &store,
            quant: QuantConfig::parse(&config)?,
        };
        let net = crate::models::build(&config, &loader)?;
        let mut w = Widths {
            hidden: config.hidden_size,
            ..Default::default()
        };
        for b in &net.blocks {
            let Mixer::Gqa(a) = &b.mixer;
            let (h, kv, hd) = a.dims();
            w.q = w.q.max(h * hd);
            w.kv = w.kv.max(kv * hd);
            match &b.ffn {
                Ffn::Dense(m) => w.inter = w.inter.max(m.inter()),
                Ffn::Moe(m) => {
                    w.inter = w.inter.max(m.experts.inter());
                    if let Some(s) = &m.shared {
                        w.inter = w.inter.max(s.inter());
                    }
                    w.experts = w.experts.max(m.experts.len());
                }
            }
        }
        Ok(Model {
            lanes: Default::default(),
            net,
            widths: w,
            config,
            store,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }
    pub(crate) fn net(&self) -> &Transformer {
        &self.net
    }

    /// Pack the matmul weights for the CPU kernels (once); returns bytes packed.
    pub fn prepare_cpu(&self) -> usize {
        self.lanes
            .get_or_init(|| {
                let net = &self.net;
                let mut ws: Vec<rooftop_quant::WeightView> = Vec::new();
                let mlp = |m: &crate::layers::Mlp, ws: &mut Vec<_>| {
                    ws.extend([m.gate.w, m.up.w, m.down.w]);
                };
                for b in &net.blocks {
                    let Mixer::Gqa(a) = &b.mixer;
                    ws.extend([a.q.w, a.k.w, a.v.w, a.o.w]);
                    match &b.ffn {
                        Ffn::Dense(m) => mlp(m, &mut ws),
                        Ffn::Moe(m) => {
                            ws.push(m.gate.w);
                            let e = &m.experts;
                            ws.extend(e.gate.iter().chain(&e.up).chain(&e.down).copied());
                            if let Some(s) = &m.shared {
                                mlp(s, &mut ws);
                            }
                        }
                    }
                }
                // The tied embedding doubles as lm_head (its rows stay natural too).
                ws.push(net.lm_head.as_ref().map_or(net.embed.w, |l| l.w));
                rooftop_cpu::lanes::pack_all(&ws)
            })
            .bytes
    }
    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
    /// Context length the model was trained for (`max_position_embeddings`), if stated.
    pub fn max_context(&self) -> Option<usize> {
        self.config.max_position_embeddings
    }
    /// Bytes of weights mapped.
    pub fn weight_bytes(&self) -> usize {
        self.store.nbytes()
    }

    /// A KV cache for up to `max_seq` tokens (allocated now, once).
    pub fn new_cache(&self, max_seq: usize) -> Cache {
        Cache {
            layers: self
                .net
                .blocks
                .iter()
                .map(|b| match &b.mixer {
                    Mixer::Gqa(a) => LayerCache::Kv(a.new_cache(max_seq)),
                })
                .collect(),
            max_seq,
            len: 0,
            scratch: Scratch::default(),
        }
    }

    /// Run `tokens` after what `cache` holds; returns logits `[V]` or `[T, V]`.
    pub fn forward(&self, tokens: &[u32], cache: &mut Cache, which: Logits) -> Result<Vec<f32>> {
        self.prepare_cpu();
        let t = tokens.len();
        let vocab = self.config.vocab_size;
        if t == 0 {
            return Err(EngineError::Invalid(
                "forward needs at least one token".into(),
            ));
        }
        if cache.len + t > cache.max_seq {
            return Err(EngineError::ContextOverflow {
                tokens: cache.len + t,
                max: cache.max_seq,
            });
        }
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= vocab) {
            return Err(EngineError::BadToken { id, vocab });
        }
        let d = self.config.hidden_size;
        let pos = cache.len;
        let s = &mut cache.scratch;
        s.ensure(t, self.widths);
        let mut h = std::mem::take(&mut s.h);
        let mut xn = std::mem::take(&mut s.xn);
        let mut y = std::mem::take(&mut s.y);
        let (h_, xn_, y_) = (&mut h[..t * d], &mut xn[..t * d], &mut y[..t * d]);
        self.net.embed.forward(tokens, h_); // [T, D]
        if let Some(sc) = self.net.embed_scale {
            h_.iter_mut().for_each(|v| *v *= sc);
        }
        for (b, kv) in self.net.blocks.iter().zip(cache.layers.iter_mut()) {
            b.input_norm.forward(h_, xn_);
            match (&b.mixer, kv) {
                (Mixer::Gqa(a), LayerCache::Kv(kv)) => a.forward(xn_, t, pos, kv, s, y_),
            }
            if let Some(n) = &b.post_mixer_norm {
                n.forward_inplace(y_);
            }
            h_.iter_mut().zip(y_.iter()).for_each(|(h, y)| *h += y);
            b.post_norm.forward(h_, xn_);
            match &b.ffn {
                Ffn::Dense(m) => m.forward(xn_, t, s, y_),
                Ffn::Moe(m) => m.forward(xn_, t, s, y_),
            }
            if let Some(n) = &b.post_ffn_norm {
                n.forward_inplace(y_);
            }
            h_.iter_mut().zip(y_.iter()).for_each(|(h, y)| *h += y);
        }
        let rows = match which {
            Logits::Last => &h_[(t - 1) * d..],
            Logits::All => &h_[..],
        };
        let n = rows.len() / d;
        let xf = &mut xn_[..n * d];
        self.net.norm.forward(rows, xf);
        let mut logits = vec![0f32; n * vocab];
        match &self.net.lm_head {
            Some(l) => l.forward(xf, n, &mut logits),
            None => rooftop_cpu::matmul(&self.net.embed.w, xf, n, &mut logits),
        }
        s.h = h;
        s.xn = xn;
        s.y = y;
        cache.len += t;
        Ok(logits)
    }
}
