#!/usr/bin/env python3
"""Time batch-1 greedy decode of a model directory with transformers, on the CPU.

The CPU decode bench (`cargo bench --bench cpu_decode`) writes its random-weight model
to a directory and runs this on the same weights when MESH_BENCH_PYTHON names a Python
that has torch and transformers, so the two figures come from one run:

    MESH_BENCH_PYTHON=python3 cargo bench --bench cpu_decode

By hand:  python3 scripts/time_transformers.py DIR --tokens 64 --context 16 --threads 2

Prints one line: `ms_per_token <float> torch <version> transformers <version>`.
"""
import argparse
import time

import torch
import transformers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--context", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=dtype, attn_implementation="eager"
    ).eval()
    ids = torch.tensor([[1 + i % 250 for i in range(args.context)]])
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        # Two warm-up steps, as the Rust side does.
        for _ in range(2):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        started = time.perf_counter()
        for _ in range(args.tokens):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        seconds = time.perf_counter() - started
    print(
        f"ms_per_token {seconds * 1e3 / args.tokens:.3f} "
        f"torch {torch.__version__} transformers {transformers.__version__}"
    )


if __name__ == "__main__":
    main()
