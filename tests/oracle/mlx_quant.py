"""Oracle for rooftop-quant: runs mx.quantize / mx.dequantize on every case.

usage: mlx_quant.py IN_DIR
IN_DIR/inputs.safetensors holds tensors; IN_DIR/cases.json lists
{"name", "tensor", "mode", "bits", "group_size", "global_scale"}.
Writes IN_DIR/outputs.safetensors with NAME.w, NAME.s, (NAME.b), NAME.dq
(dequantized to the input dtype) and NAME.dq_f32 (dequantized to float32).
"""
import json
import sys

import mlx.core as mx

d = sys.argv[1]
inputs = mx.load(f"{d}/inputs.safetensors")
cases = json.load(open(f"{d}/cases.json"))
out = {}
for c in cases:
    n = c["name"]
    if c.get("given"):
        # Dequantize bytes rooftop wrote (e.g. its optimizing quantizer's output).
        kw = dict(group_size=c["group_size"], bits=c["bits"], mode=c["mode"])
        b = inputs.get(n + ".b")
        out[n + ".dq_f32"] = mx.dequantize(
            inputs[n + ".w"], inputs[n + ".s"], b, dtype=mx.float32, **kw
        )
        continue
    w = inputs[c["tensor"]]
    kw = dict(group_size=c["group_size"], bits=c["bits"], mode=c["mode"])
    if c.get("global_scale") is not None:
        kw["global_scale"] = mx.array(c["global_scale"], dtype=mx.float32)
    res = mx.quantize(w, **kw)
    out[n + ".w"] = res[0]
    out[n + ".s"] = res[1]
    biases = None
    if c["mode"] == "affine":
        biases = res[2]
        out[n + ".b"] = biases
    dkw = dict(kw)
    out[n + ".dq"] = mx.dequantize(res[0], res[1], biases, dtype=w.dtype, **dkw)
    out[n + ".dq_f32"] = mx.dequantize(res[0], res[1], biases, dtype=mx.float32, **dkw)
mx.eval(out)
mx.save_safetensors(f"{d}/outputs.safetensors", out)
print(json.dumps({"mlx": mx.__version__, "cases": len(cases)}))
