"""Oracle for rooftop-convert: tiny random HF checkpoints, mlx_lm.convert, mlx-lm logits.

usage:
  mlx_convert.py make DIR          build DIR/<arch>/ for every architecture: config.json,
                                   two bf16 safetensors shards in the HF per-expert layout
                                   (+ index), tokenizer.json, tokenizer_config.json,
                                   generation_config.json. Prints {"archs": [...]}.
  mlx_convert.py convert CASES     CASES is a JSON list of {"hf", "out", "quantize",
                                   "q_bits", "q_group_size", "q_mode", "dtype",
                                   "quant_predicate", "shard_bytes"}; runs
                                   mlx_lm.convert.convert for each (shard_bytes, when set,
                                   replaces the 5 GiB shard limit).
  mlx_convert.py logits PAIRS      PAIRS is a JSON list of [model_a, model_b]; loads each
                                   with mlx_lm.utils.load, runs one forward pass on fixed
                                   tokens and prints [{"max_abs_diff", "identical", "scale"}]
                                   or [{"errors": [...]}] where MLX's CPU backend cannot
                                   run the model.
  mlx_convert.py eval SPEC         SPEC is {"reference", "models": [...], "text", "ctx"}:
                                   tokenizes the text with the reference's tokenizer, runs
                                   each ctx-token chunk through every model with mlx-lm and
                                   prints per model {"tokens", "perplexity", "mean_kl",
                                   "p99_kl", "max_kl", "top1_agreement"} (KL of the model
                                   from the reference, nearest-rank quantiles).
  mlx_convert.py describe MODEL    loads MODEL with mlx_lm.utils.load and prints every leaf
                                   module with a weight as {path: {"mode", "bits",
                                   "group_size"}} (quantized) or {path: "dense"}, plus
                                   whether a forward pass gives finite logits.
"""
import json
import os
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

VOCAB = 256

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=512,
    torch_dtype="bfloat16",
)

CONFIGS = {
    "qwen3_moe": dict(
        COMMON,
        model_type="qwen3_moe",
        architectures=["Qwen3MoeForCausalLM"],
        num_hidden_layers=4,
        intermediate_size=256,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[3],
        moe_intermediate_size=64,
        tie_word_embeddings=False,
        norm_topk_prob=True,
    ),
    "glm4_moe": dict(
        COMMON,
        model_type="glm4_moe",
        architectures=["Glm4MoeForCausalLM"],
        num_hidden_layers=3,
        intermediate_size=256,
        moe_intermediate_size=64,
        norm_topk_prob=True,
        n_group=1,
        topk_group=1,
        n_shared_experts=1,
        n_routed_experts=8,
        routed_scaling_factor=1.0,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        rope_scaling=None,
        use_qk_norm=True,
        tie_word_embeddings=False,
        attention_bias=True,
        partial_rotary_factor=0.5,
        _name_or_path="zai-org/tiny-random",
    ),
    "mixtral": dict(
        COMMON,
        model_type="mixtral",
        architectures=["MixtralForCausalLM"],
        num_hidden_layers=2,
        intermediate_size=64,
        num_local_experts=8,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    ),
    "llama": dict(
        COMMON,
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        num_hidden_layers=2,
        intermediate_size=256,
        tie_word_embeddings=True,
    ),
}


def hf_names(arch, name, value):
    """MLX parameter → HF checkpoint tensors (undoing sanitize's expert stacking)."""
    if ".switch_mlp." not in name:
        return [(name, value)]
    prefix, proj = name.split(".switch_mlp.")
    proj = proj.split(".")[0]
    if arch == "mixtral":
        hf = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}[proj]
    else:
        hf = proj
    return [
        (f"{prefix}.experts.{e}.{hf}.weight", value[e]) for e in range(value.shape[0])
    ]


def make_tokenizer(d):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, VOCAB):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    json.dump(
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "model_max_length": 512,
        },
        open(d / "tokenizer_config.json", "w"),
    )
    json.dump(
        {"bos_token_id": 1, "eos_token_id": [2, 7]},
        open(d / "generation_config.json", "w"),
    )


def make(root):
    import importlib

    root = Path(root)
    for i, (arch, cfg) in enumerate(CONFIGS.items()):
        d = root / arch
        d.mkdir(parents=True, exist_ok=True)
        mod = importlib.import_module(f"mlx_lm.models.{arch}")
        model = mod.Model(mod.ModelArgs.from_dict(cfg))
        mx.random.seed(1234 + i)
        weights = {}
        for name, v in tree_flatten(model.parameters()):
            if name.endswith("norm.weight"):
                v = 1.0 + 0.1 * mx.random.normal(v.shape)
            elif "e_score_correction_bias" in name:
                v = 0.1 * mx.random.normal(v.shape)
            else:
                # Heavy-ish tails so formats differ visibly.
                v = 0.05 * mx.random.normal(v.shape) * (1 + mx.random.uniform(shape=v.shape) ** 8 * 4)
            dtype = mx.float32 if "e_score_correction_bias" in name else mx.bfloat16
            for n, t in hf_names(arch, name, v.astype(dtype)):
                weights[n] = t
        if arch == "llama":
            # Old checkpoints carry precomputed rotary frequencies; sanitize drops them.
            for l in range(cfg["num_hidden_layers"]):
                weights[f"model.layers.{l}.self_attn.rotary_emb.inv_freq"] = mx.arange(16, dtype=mx.float32)
        if arch == "glm4_moe":
            # The multi-token-prediction layer, dropped by sanitize.
            n = cfg["num_hidden_layers"]
            weights[f"model.layers.{n}.eh_proj.weight"] = mx.zeros((128, 256), dtype=mx.bfloat16)
        names = sorted(weights)
        half = len(names) // 2
        files = {
            "model-00001-of-00002.safetensors": names[:half],
            "model-00002-of-00002.safetensors": names[half:],
        }
        wmap = {}
        for f, ns in files.items():
            mx.save_safetensors(str(d / f), {n: weights[n] for n in ns}, metadata={"format": "pt"})
            wmap.update({n: f for n in ns})
        json.dump({"metadata": {}, "weight_map": wmap}, open(d / "model.safetensors.index.json", "w"))
        json.dump(cfg, open(d / "config.json", "w"), indent=2)
        make_tokenizer(d)
    print(json.dumps({"archs": list(CONFIGS)}))


def convert(cases_path):
    import mlx_lm.utils as U
    from mlx_lm.convert import convert as mlx_convert

    orig = U.make_shards
    for c in json.load(open(cases_path)):
        limit = c.get("shard_bytes")
        if limit:

            def shards(weights, max_file_size_gb=5, limit=limit):
                out, size = [], 0
                for k, v in weights.items():
                    if not out or size + v.nbytes > limit:
                        out.append({})
                        size = 0
                    out[-1][k] = v
                    size += v.nbytes
                return out

            U.make_shards = shards
        else:
            U.make_shards = orig
        mlx_convert(
            c["hf"],
            c["out"],
            quantize=c.get("quantize", False),
            q_group_size=c.get("q_group_size"),
            q_bits=c.get("q_bits"),
            q_mode=c.get("q_mode") or "affine",
            dtype=c.get("dtype"),
            quant_predicate=c.get("quant_predicate"),
        )
    U.make_shards = orig
    print(json.dumps({"converted": len(json.load(open(cases_path)))}))


def logits(pairs_path):
    from mlx_lm.utils import load

    tokens = mx.array([[1, 5, 9, 200, 31, 77, 3, 250, 12, 64]])
    out = []
    for a, b in json.load(open(pairs_path)):
        res, errs = [], []
        for p in (a, b):
            model, _ = load(p)
            try:
                y = model(tokens).astype(mx.float32)
                mx.eval(y)
                res.append(y)
            except RuntimeError as e:
                # MLX's CPU backend lacks some kernels (e.g. GatherMM for bf16); the
                # caller checks that both models fail the same way.
                errs.append(str(e))
        if errs:
            out.append({"errors": errs})
            continue
        diff = mx.abs(res[0] - res[1]).max().item()
        out.append(
            {
                "max_abs_diff": diff,
                "identical": bool(mx.array_equal(res[0], res[1]).item()),
                "scale": mx.abs(res[0]).max().item(),
            }
        )
    print(json.dumps(out))


def describe(path):
    from mlx_lm.utils import load

    model, _ = load(path)
    mods = {}
    for name, m in model.named_modules():
        if "weight" not in m or m.children():
            continue
        if hasattr(m, "bits"):
            mods[name] = {"mode": m.mode, "bits": m.bits, "group_size": m.group_size}
        else:
            mods[name] = "dense"
    y = model(mx.array([[1, 5, 9, 200, 31]])).astype(mx.float32)
    finite = bool(mx.all(mx.isfinite(y)).item())
    print(json.dumps({"modules": mods, "finite": finite}))


def evaluate(spec_path):
    import numpy as np
    from mlx_lm.utils import load

    spec = json.load(open(spec_path))
    ref, tok = load(spec["reference"])
    ids = tok.encode(open(spec["text"]).read(), add_special_tokens=False)
    ctx = spec["ctx"]
    chunks = [ids[i : i + ctx] for i in range(0, len(ids), ctx)]
    chunks = [c for c in chunks if len(c) >= 2]

    def logprobs(model, c):
        y = model(mx.array([c])).astype(mx.float32)[0]
        return np.array(y - mx.logsumexp(y, axis=-1, keepdims=True), dtype=np.float64)

    ref_lp = [logprobs(ref, c) for c in chunks]
    out = []
    for path in [None] + spec["models"]:
        model = ref if path is None else load(path)[0]
        nll, kl, same = [], [], []
        for c, lr in zip(chunks, ref_lp):
            lq = lr if path is None else logprobs(model, c)
            for t in range(len(c) - 1):
                nll.append(-lq[t, c[t + 1]])
                kl.append(max(0.0, float(np.sum(np.exp(lr[t]) * (lr[t] - lq[t])))))
                same.append(int(np.argmax(lr[t]) == np.argmax(lq[t])))
        kls = sorted(kl)
        q = lambda p: kls[int(round((len(kls) - 1) * p))]
        out.append(
            {
                "tokens": len(nll),
                "perplexity": float(np.exp(np.mean(nll))),
                "mean_kl": float(np.mean(kl)),
                "p99_kl": q(0.99),
                "max_kl": kls[-1],
                "top1_agreement": float(np.mean(same)),
            }
        )
    print(json.dumps(out))


if __name__ == "__main__":
    cmd, arg = sys.argv[1], sys.argv[2]
    {"make": make, "convert": convert, "logits": logits, "describe": describe, "eval": evaluate}[cmd](arg)
