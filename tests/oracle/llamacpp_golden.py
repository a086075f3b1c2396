"""llama.cpp (via llama-cpp-python) reference outputs for the real GGUF models.

llama.cpp is compiled from source by `pip install llama-cpp-python`, which takes too
long for CI, so its outputs are recorded here once and committed under
tests/oracle/golden/; the Rust tests compare against those files.

  llamacpp_golden.py tokenize MODEL.gguf PROMPTS.txt OUT.txt
      PROMPTS.txt holds one JSON string per line; OUT.txt gets one line per prompt:
      the token ids llama.cpp produces (add_bos as the model says, special=True).
  llamacpp_golden.py bench MODEL.gguf [N] [THREADS]
      Decode tok/s of N greedy tokens.
  llamacpp_golden.py generate MODEL.gguf PROMPTS.txt OUT.txt [N]
      Greedy decode N (default 64) tokens after each prompt (prompt fed one token per
      step); each output line is a JSON object
      {"prompt": ids, "tokens": ids, "top": [[[id, logit] x5] per step]}.

Regenerate everything: scripts/fetch-models && tests/oracle/llamacpp_golden.py all
"""
import json
import sys
from pathlib import Path

import numpy as np
from llama_cpp import Llama

ROOT = Path(__file__).resolve().parents[2]
MODELS = {
    "smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3": "gemma-3-270m-q4_k_m.gguf",
}


def prompts(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def tokenize(model, prompts_path, out):
    llm = Llama(model_path=str(model), vocab_only=True, verbose=False)
    lines = []
    for p in prompts(prompts_path):
        ids = llm.tokenize(p.encode("utf-8"), add_bos=True, special=True)
        lines.append(" ".join(map(str, ids)))
    Path(out).write_text("\n".join(lines) + "\n")


def generate(model, prompts_path, out, n=64):
    llm = Llama(model_path=str(model), n_ctx=512, n_batch=512, n_threads=2, logits_all=True, verbose=False, seed=0)
    lines = []
    for p in prompts(prompts_path):
        llm.reset()
        ids = llm.tokenize(p.encode("utf-8"), add_bos=True, special=True)
        # One token per step, prompt included: llama.cpp's decode path (vec_dot per
        # row), which rooftop reproduces bit for bit. A batched prompt goes through
        # tinyBLAS tiles that sum in another order (a few ulps in the KV cache).
        for t in ids:
            llm.eval([t])
        toks, top = [], []
        for _ in range(n):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            order = np.argsort(-logits, kind="stable")[:5]
            top.append([[int(i), float(logits[i])] for i in order])
            t = int(order[0])
            toks.append(t)
            llm.eval([t])
        lines.append(json.dumps({"prompt": ids, "tokens": toks, "top": top}))
    Path(out).write_text("\n".join(lines) + "\n")


def bench(model, n=64, threads=2):
    """Decode tok/s of greedy generation (prompt excluded), as rooftop reports it."""
    import time
    llm = Llama(model_path=str(model), n_ctx=512, n_threads=int(threads), verbose=False, seed=0)
    ids = llm.tokenize(b"Once upon a time, in a small village by the sea,", add_bos=True, special=True)
    llm.eval(ids)
    t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t0 = time.perf_counter()
    for _ in range(int(n)):
        llm.eval([t])
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    dt = time.perf_counter() - t0
    print(f"{Path(model).name}: {int(n) / dt:.1f} tok/s decode ({threads} threads)")


def all_golden():
    models = Path(ROOT / ".cache/models")
    g = ROOT / "tests/oracle/golden"
    for name, f in MODELS.items():
        tokenize(models / f, g / "tokenizer_prompts.txt", g / f"{name}.tokens.txt")
        generate(models / f, g / f"{name}.generate_prompts.txt", g / f"{name}.generate.jsonl")
        print(f"{name}: llama_cpp {__import__('llama_cpp').__version__}")


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "tokenize":
        tokenize(*sys.argv[2:5])
    elif cmd == "generate":
        generate(*sys.argv[2:5], *(int(a) for a in sys.argv[5:6]))
    elif cmd == "bench":
        bench(*sys.argv[2:])
    elif cmd == "all":
        all_golden()
    else:
        raise SystemExit(f"unknown command {cmd}")
