"""Tiny random models and mlx-lm reference logits for the engine's tests.

usage: mlx_lm_model.py ARCH OUTDIR [VARIANT,VARIANT...]

Builds `mlx_lm.models.<ARCH>.Model` from a tiny config with random weights (norms
and biases perturbed too, so every parameter matters), writes it in the Hugging Face
layout (bf16, experts stored one by one, two shards + index) with a small byte-level
BPE tokenizer and chat template, then lets `mlx_lm.convert` make the MLX variants:
stacked bf16, affine 4/3-bit, nvfp4, mxfp4 and the mixed_3_4 recipe.

For every variant it loads the directory with `mlx_lm.load`, lifts the float
parameters to float32 (the CPU gather_mm is float32-only, and an f32 reference lets
us compare tightly; quantized codes and scales are unchanged by the lift) and writes
  <variant>.npy        logits [L, V] for OUTDIR/manifest.json "tokens"
and into manifest.json, per variant, a greedy continuation of "prompt" with the
top-1 margin at each step. For the "hf" directory it also records what the text
path must reproduce: the token ids of TEXT_PROMPT, its greedy continuation (stopping
at EOS) with logits for every position (text.npy), and the chat-templated ids of
CHAT (mlx-lm's tokenizer wrapper, i.e. transformers' apply_chat_template).
"""

import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

BASE = dict(
    vocab_size=300,
    hidden_size=128,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=512,
    rope_theta=10000.0,
    torch_dtype="bfloat16",
    eos_token_id=2,
)

CONFIGS = {
    "qwen3_moe": dict(
        num_hidden_layers=3,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
        moe_intermediate_size=64,
        norm_topk_prob=True,
        tie_word_embeddings=False,
    ),
    "llama": dict(
        tie_word_embeddings=True,
        intermediate_size=256,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "qwen2": dict(tie_word_embeddings=True, rope_theta=1e6),
    "qwen3": dict(
        head_dim=32,
        tie_word_embeddings=False,
        rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64),
    ),
    "mixtral": dict(
        num_local_experts=8,
        num_experts_per_tok=2,
        intermediate_size=64,
        tie_word_embeddings=False,
    ),
    "glm4_moe": dict(
        num_hidden_layers=3,
        head_dim=32,
        partial_rotary_factor=0.5,
        use_qk_norm=True,
        attention_bias=True,
        n_routed_experts=8,
        n_group=2,
        topk_group=1,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        moe_intermediate_size=64,
        norm_topk_prob=True,
        tie_word_embeddings=False,
        rope_scaling=None,
    ),
}

VARIANTS = {
    "mlx_bf16": dict(quantize=False),
    "affine4": dict(quantize=True, q_bits=4, q_group_size=64),
    "affine3": dict(quantize=True, q_bits=3, q_group_size=32),
    "nvfp4": dict(quantize=True, q_mode="nvfp4"),
    "mxfp4": dict(quantize=True, q_mode="mxfp4"),
    "mixed_3_4": dict(quantize=True, q_group_size=64, quant_predicate="mixed_3_4"),
}

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture of experts models route each token to a few experts.",
    "Hello world! Quantized weights stream faster than dense ones.",
    "rooftop runs models at the memory bandwidth limit on the CPU and GPU.",
] * 4


def make_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=BASE["vocab_size"],
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.get_vocab_size() <= BASE["vocab_size"]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return fast.convert_tokens_to_ids("<|im_end|>")


def randomize(model):
    """Perturb what mlx initializes to constants (norm weights 1, biases 0)."""
    params = {}
    for k, v in tree_flatten(model.parameters()):
        if k.endswith("norm.weight"):
            v = 1.0 + 0.2 * mx.random.normal(v.shape)
        elif k.endswith(".bias") or k.endswith("e_score_correction_bias"):
            v = 0.2 * mx.random.normal(v.shape)
        elif k.endswith("embed_tokens.weight"):
            v = mx.random.normal(v.shape)
        params[k] = v
    model.load_weights(list(params.items()))


def hf_name(arch, k):
    """MLX parameter name → Hub names (experts unstacked)."""
    if ".switch_mlp." not in k:
        return None
    pre, rest = k.split(".switch_mlp.")
    proj = rest.split(".")[0]
    if arch == "mixtral":
        proj = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}[proj]
    return lambda e: f"{pre}.experts.{e}.{proj}.weight"


def write_hf(arch, cfg, out: Path):
    import importlib

    mod = importlib.import_module(f"mlx_lm.models.{arch}")
    model = mod.Model(mod.ModelArgs.from_dict(cfg))
    randomize(model)
    weights = {}
    for k, v in tree_flatten(model.parameters()):
        v = v.astype(mx.bfloat16)
        name = hf_name(arch, k)
        if name is None:
            weights[k] = v
        else:
            for e in range(v.shape[0]):
                weights[name(e)] = v[e]
    out.mkdir(parents=True)
    keys = sorted(weights)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    index = {"metadata": {}, "weight_map": {}}
    for i, ks in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(out / fname), {k: weights[k] for k in ks}, metadata={"format": "pt"})
        index["weight_map"].update({k: fname for k in ks})
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (out / "config.json").write_text(json.dumps(cfg, indent=1))


def reference(path: Path, tokens, prompt, steps):
    from mlx_lm import load

    model, _ = load(str(path))
    model.set_dtype(mx.float32)
    logits = model(mx.array(tokens)[None]).astype(mx.float32)[0]
    seq = list(prompt)
    greedy, margins = [], []
    for _ in range(steps):
        last = np.array(model(mx.array(seq)[None]).astype(mx.float32)[0, -1])
        order = np.argsort(-last)
        greedy.append(int(order[0]))
        margins.append(float(last[order[0]] - last[order[1]]))
        seq.append(int(order[0]))
    return np.array(logits), greedy, margins


TEXT_PROMPT = "The quick brown fox"
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello world!"},
]


def text_reference(path: Path, eos, steps=8):
    from mlx_lm import load

    model, tok = load(str(path))
    model.set_dtype(mx.float32)
    prompt = tok.encode(TEXT_PROMPT)
    seq = list(prompt)
    gen = []
    for _ in range(steps):
        nxt = int(mx.argmax(model(mx.array(seq)[None])[0, -1]).item())
        gen.append(nxt)
        if nxt == eos:
            break
        seq.append(nxt)
    logits = np.array(model(mx.array(seq)[None]).astype(mx.float32)[0])
    chat = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    return logits, {"prompt_ids": prompt, "generated": gen, "chat_ids": list(chat), "text": TEXT_PROMPT}


def main():
    arch, out = sys.argv[1], Path(sys.argv[2])
    only = sys.argv[3].split(",") if len(sys.argv) > 3 else list(VARIANTS)
    import contextlib
    import io

    from mlx_lm.convert import convert

    mx.random.seed(1234)
    cfg = dict(BASE, model_type=arch, **CONFIGS[arch])
    if out.exists():
        shutil.rmtree(out)
    hf = out / "hf"
    write_hf(arch, cfg, hf)
    eos = make_tokenizer(hf)
    cfg["eos_token_id"] = eos
    (hf / "config.json").write_text(json.dumps(cfg, indent=1))

    rng = np.random.default_rng(7)
    tokens = [int(t) for t in rng.integers(0, cfg["vocab_size"], 24)]
    prompt, steps = tokens[:8], 12
    manifest = {"tokens": tokens, "prompt": prompt, "eos": eos, "variants": {}}
    logits, manifest["text"] = text_reference(hf, eos)
    np.save(out / "text.npy", logits)
    for name in ["hf", *only]:
        path = out / name
        if name != "hf":
            with contextlib.redirect_stdout(io.StringIO()):
                convert(str(hf), str(path), **VARIANTS[name])
        logits, greedy, margins = reference(path, tokens, prompt, steps)
        np.save(out / f"{name}.npy", logits)
        manifest["variants"][name] = {"greedy": greedy, "margins": margins}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(json.dumps({k: list(v) for k, v in manifest["variants"].items()}))


if __name__ == "__main__":
    main()
