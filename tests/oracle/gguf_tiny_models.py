"""Tiny random GGUF models of the architectures llama.cpp names qwen2, qwen3 and qwen3moe,
written with gguf-py's GGUFWriter, and (optionally) llama.cpp's greedy run on them.

  gguf_tiny_models.py write DIR
      DIR/<arch>.gguf for every arch; prints "<arch> <sha256>" lines. Deterministic
      (numpy PCG64, seed per arch), so CI rebuilds the same bytes from gguf-py alone.
  gguf_tiny_models.py golden DIR OUT.jsonl
      Needs llama-cpp-python (not in CI: it takes over an hour to build here). Feeds
      PROMPT one token per step, then greedy-decodes STEPS tokens; one JSON line per
      arch: {"arch", "sha256", "prompt", "tokens", "top": [[[id, logit] x5] per step]}.
"""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q

VOCAB, HIDDEN, FF, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 256, 128, 256, 2, 4, 2, 32
EXPERTS, USED, FF_EXP = 8, 2, 64
PROMPT = [1, 17, 42, 99, 3, 250, 7]
STEPS = 24
ARCHS = ["qwen2", "qwen3", "qwen3moe"]


def seed(arch):
    return sum(ord(c) * 131 ** i for i, c in enumerate(arch)) % (1 << 32)


def write(arch, path):
    rng = np.random.default_rng(seed(arch))
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    if arch == "qwen3moe":
        w.add_expert_count(EXPERTS)
        w.add_expert_used_count(USED)
        w.add_expert_feed_forward_length(FF_EXP)
    # A byte-level BPE vocabulary just large enough for llama.cpp to load it.
    toks = [f"<t{i}>" for i in range(VOCAB - 3)] + ["a", "b", "ab"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_types([1] * VOCAB)
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)

    def t(name, shape, ty=Q.Q8_0, scale=None):
        fan_in = shape[-1]
        a = (rng.standard_normal(shape) * (scale or fan_in ** -0.5)).astype(np.float32)
        if ty == Q.F32:
            w.add_tensor(name, a)
        else:
            w.add_tensor(name, gguf.quants.quantize(a, ty), raw_dtype=ty)

    def norm(name, n):
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    t("token_embd.weight", (VOCAB, HIDDEN), scale=1.0)
    norm("output_norm.weight", HIDDEN)
    t("output.weight", (VOCAB, HIDDEN))
    for i in range(LAYERS):
        p = f"blk.{i}"
        norm(f"{p}.attn_norm.weight", HIDDEN)
        norm(f"{p}.ffn_norm.weight", HIDDEN)
        t(f"{p}.attn_q.weight", (HEADS * HEAD_DIM, HIDDEN), Q.Q4_0 if arch == "qwen2" else Q.Q8_0)
        t(f"{p}.attn_k.weight", (KV_HEADS * HEAD_DIM, HIDDEN), Q.Q5_1 if arch == "qwen2" else Q.Q8_0)
        t(f"{p}.attn_v.weight", (KV_HEADS * HEAD_DIM, HIDDEN))
        t(f"{p}.attn_output.weight", (HIDDEN, HEADS * HEAD_DIM), Q.Q4_1 if arch == "qwen2" else Q.Q8_0)
        if arch == "qwen2":
            for n, k in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
                w.add_tensor(f"{p}.attn_{n}.bias",
                             (0.1 * rng.standard_normal(k * HEAD_DIM)).astype(np.float32))
        else:
            norm(f"{p}.attn_q_norm.weight", HEAD_DIM)
            norm(f"{p}.attn_k_norm.weight", HEAD_DIM)
        if arch == "qwen3moe":
            t(f"{p}.ffn_gate_inp.weight", (EXPERTS, HIDDEN), Q.F32)
            t(f"{p}.ffn_gate_exps.weight", (EXPERTS, FF_EXP, HIDDEN))
            t(f"{p}.ffn_up_exps.weight", (EXPERTS, FF_EXP, HIDDEN))
            t(f"{p}.ffn_down_exps.weight", (EXPERTS, HIDDEN, FF_EXP))
        else:
            t(f"{p}.ffn_gate.weight", (FF, HIDDEN), Q.Q5_0 if arch == "qwen2" else Q.Q8_0)
            t(f"{p}.ffn_up.weight", (FF, HIDDEN))
            t(f"{p}.ffn_down.weight", (HIDDEN, FF), Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_all(d):
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    for a in ARCHS:
        print(a, write(a, d / f"{a}.gguf"))


def golden(d, out):
    from llama_cpp import Llama
    lines = []
    for a in ARCHS:
        path = Path(d) / f"{a}.gguf"
        sha = write(a, path)
        llm = Llama(model_path=str(path), n_ctx=128, n_batch=128, n_threads=1,
                    logits_all=True, verbose=False, seed=0)
        for tok in PROMPT:
            llm.eval([tok])
        toks, top = [], []
        for _ in range(STEPS):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            order = np.argsort(-logits, kind="stable")[:5]
            top.append([[int(i), float(logits[i])] for i in order])
            toks.append(int(order[0]))
            llm.eval([int(order[0])])
        lines.append(json.dumps({"arch": a, "sha256": sha, "prompt": PROMPT,
                                 "tokens": toks, "top": top}))
    Path(out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write_all(sys.argv[2])
    elif sys.argv[1] == "golden":
        golden(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown command {sys.argv[1]}")
