"""GGUF oracle (gguf-py, the reference Python implementation shipped with llama.cpp).

  gguf_dequant.py make OUT.gguf
      Writes a GGUF with gguf-py's writer: every metadata value type (arrays included)
      and one tensor per type gguf-py can quantize, quantized by gguf.quants.quantize
      from seeded random data.
  gguf_dequant.py dequant IN.gguf OUT_DIR [TENSOR...]
      Reads IN.gguf with gguf-py's reader and writes OUT_DIR/<tensor>.f32 (raw
      little-endian float32) from gguf.quants.dequantize (all tensors, or those
      named), plus OUT_DIR/meta.txt with
      each metadata key and its gguf-py value types.
"""
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.MXFP4]


def make(out: str) -> None:
    rng = np.random.default_rng(1234)
    w = gguf.GGUFWriter(out, "llama")
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -100)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -30000)
    w.add_uint32("test.u32", 4_000_000_000)
    w.add_int32("test.i32", -2_000_000_000)
    w.add_float32("test.f32", 1.5)
    w.add_bool("test.bool", True)
    w.add_string("test.string", "héllo ▁wörld")
    w.add_uint64("test.u64", 2**63 + 5)
    w.add_int64("test.i64", -(2**62))
    w.add_float64("test.f64", -2.25)
    w.add_array("test.arr_str", ["a", "bc", ""])
    w.add_array("test.arr_i32", [1, -2, 3])
    w.add_array("test.arr_f32", [0.5, -0.25])
    w.add_custom_alignment(64)
    for qt in QUANTIZABLE:
        # Heavy-tailed values exercise the scale choice; two rows of 256.
        x = (rng.standard_normal((2, 256)) * rng.uniform(0.01, 3.0)).astype(np.float32)
        q = gguf.quants.quantize(x, qt)
        w.add_tensor(f"q.{qt.name}", q, raw_shape=q.shape, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def dequant(path: str, out_dir: str, *names: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    r = gguf.GGUFReader(path)
    lines = []
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        lines.append(f"{k}\t{','.join(t.name for t in f.types)}")
    (out / "meta.txt").write_text("\n".join(lines) + "\n")
    for t in r.tensors:
        if names and t.name not in names:
            continue
        y = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        (out / f"{t.name}.f32").write_bytes(np.ascontiguousarray(y).tobytes())


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make":
        make(sys.argv[2])
    elif cmd == "dequant":
        dequant(sys.argv[2], sys.argv[3], *sys.argv[4:])
    else:
        raise SystemExit(f"unknown command {cmd}")
