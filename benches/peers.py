#!/usr/bin/env python3
"""KSA prefill against its peers, in one run, with useful TFLOP/s.

Times, for each n (text tokens):
  * ksa-crate          the crate's fused KSA kernel      (measure/gpu_bench.rs)
  * full-causal-crate  the crate's kernel in causal mode (measure/gpu_bench.rs)
  * sdpa-full-causal   torch scaled_dot_product_attention(is_causal=True) over n
  * flex-ksa           torch FlexAttention with the KSA mask as a block mask, over
                       the N = n + S*floor(n/C) interleaved slots
and prints useful TFLOP/s = 4 * d * (allowed query-key pairs) * heads / time,
counting only allowed pairs (full causal: n(n+1)/2; KSA: the layout's exact
count), plus KSA's speedup over SDPA full causal.

GPU (the issue's setting): bf16, 32 query / 8 KV heads, d = 128, batch 1,
  python benches/peers.py --device cuda --n 8192,32768,131072
CPU smoke run (what runs without a GPU; f32, small sizes):
  python benches/peers.py --device cpu --n 512 --heads 4 --kv-heads 2 --head-dim 64

Rows whose implementation is unavailable (no torch, no FlexAttention, no CUDA
build of the crate) are printed as skipped with the reason; nothing is faked.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ksa_pairs(n, c, s, w):
    """Exact allowed (query, key) pairs of the KSA mask (docs/spec.md section 2)."""
    full = n // c
    pairs = 0
    for t in range(n):
        w0 = max(0, t // c - w)
        pairs += w0 * s + (t - w0 * c + 1)
    # summary j of chunk ch sees the C text tokens of its chunk and summaries 0..=j
    pairs += full * sum(c + j + 1 for j in range(s))
    return pairs


def ksa_mask_mod(c, s, w):
    """FlexAttention mask_mod in slot coordinates of the interleaved sequence."""
    block = c + s

    def mask_mod(b, h, q, k):
        qc, qr = q // block, q % block
        kc, kr = k // block, k % block
        q_text, k_text = qr < c, kr < c
        w0 = (qc - w).clamp(min=0)
        text_q = (k_text & (kc >= w0) & (k <= q)) | (~k_text & (kc < w0))
        sum_q = (kc == qc) & (k_text | (kr <= qr))
        return (q_text & text_q) | (~q_text & sum_q)

    return mask_mod


def time_fn(fn, sync, reps):
    fn()  # warm-up (compilation, autotuning)
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - start) * 1e3 / reps


def crate_rows(args, n):
    cmd = ["cargo", "run", "--quiet", "--release"]
    if args.device == "cuda":
        cmd += ["--features", "cuda"]
    cmd += ["--example", "gpu_bench", "--", str(n), str(args.c), str(args.s), str(args.w),
            str(args.heads), str(args.kv_heads), str(args.head_dim), str(args.reps)]
    try:
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        err = getattr(e, "stderr", "") or str(e)
        return [{"impl": name, "skipped": "crate bench failed: " + err.strip()[-300:]}
                for name in ("ksa-crate", "full-causal-crate")]
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    for r in rows:
        if r.get("device") != args.device:
            r["note"] = "ran on " + r.get("device", "?")
    return rows


def torch_rows(args, n):
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        return [{"impl": name, "skipped": "torch not importable: %s" % e}
                for name in ("sdpa-full-causal", "flex-ksa")]
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    d, hq, hkv = args.head_dim, args.heads, args.kv_heads
    big = n + args.s * (n // args.c)
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(h, length):
        return torch.randn(1, h, length, d, generator=g, dtype=torch.float32).to(dev, dtype)

    rows = []
    q, k, v = rand(hq, n), rand(hkv, n), rand(hkv, n)
    flops_full = 4 * d * (n * (n + 1) // 2) * hq
    try:
        ms = time_fn(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                     sync, args.reps)
        rows.append({"impl": "sdpa-full-causal", "device": args.device, "n": n, "slots": n,
                     "ms": ms, "pairs": n * (n + 1) // 2, "tflops": flops_full / (ms * 1e-3) / 1e12})
    except Exception as e:  # noqa: BLE001 - report, don't hide
        rows.append({"impl": "sdpa-full-causal", "skipped": repr(e)[:300]})
    del q, k, v
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        q, k, v = rand(hq, big), rand(hkv, big), rand(hkv, big)
        bm = create_block_mask(ksa_mask_mod(args.c, args.s, args.w), None, None, big, big,
                               device=args.device)
        flex = torch.compile(flex_attention) if args.device == "cuda" else flex_attention
        ms = time_fn(lambda: flex(q, k, v, block_mask=bm, enable_gqa=True), sync, args.reps)
        pairs = ksa_pairs(n, args.c, args.s, args.w)
        rows.append({"impl": "flex-ksa", "device": args.device, "n": n, "slots": big, "ms": ms,
                     "pairs": pairs, "tflops": 4 * d * pairs * hq / (ms * 1e-3) / 1e12})
    except Exception as e:  # noqa: BLE001
        rows.append({"impl": "flex-ksa", "skipped": repr(e)[:300]})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--n", default="8192,32768,131072", help="comma-separated text lengths")
    p.add_argument("--c", type=int, default=8)
    p.add_argument("--s", type=int, default=1)
    p.add_argument("--w", type=int, default=128)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--skip-crate", action="store_true")
    p.add_argument("--json", help="also write all rows to this file")
    args = p.parse_args()
    all_rows = []
    print("| n | impl | device | ms | useful TFLOP/s | note |")
    print("|---|---|---|---|---|---|")
    for n in [int(x) for x in args.n.split(",")]:
        rows = ([] if args.skip_crate else crate_rows(args, n)) + torch_rows(args, n)
        sdpa = next((r for r in rows if r.get("impl") == "sdpa-full-causal" and "ms" in r), None)
        for r in rows:
            r["n"] = n
            if "skipped" in r:
                print("| %d | %s | - | - | - | skipped: %s |" % (n, r["impl"], r["skipped"].replace("|", "/")[:160]))
                continue
            note = r.get("note", "")
            if r["impl"] == "ksa-crate" and sdpa:
                note = (note + " " if note else "") + "%.2fx faster than SDPA full causal" % (sdpa["ms"] / r["ms"])
            print("| %d | %s | %s | %.3f | %.4g | %s |" % (n, r["impl"], r.get("device", "?"), r["ms"], r["tflops"], note))
        all_rows += rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
