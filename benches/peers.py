#!/usr/bin/env python3
"""KSA prefill against its peers, in one run, with useful TFLOP/s.

Times, for each n (text tokens):
  * ksa-crate          the crate's fused KSA kernel      (measure/gpu_bench.rs)
  * full-causal-crate  the crate's kernel in causal mode (measure/gpu_bench.rs)
  * sdpa-full-causal   torch scaled_dot_product_attention(is_causal=True) over n,
                       flash backend on CUDA (sdpa-cudnn-full-causal: cuDNN's)
  * flex-ksa           torch FlexAttention with the KSA mask as a block mask, over
                       the N = n + S*floor(n/C) interleaved slots
and prints useful TFLOP/s = 4 * d * (allowed query-key pairs) * heads / time,
counting only allowed pairs (full causal: n(n+1)/2; KSA: the layout's exact
count), plus KSA's speedup over SDPA full causal. Times are medians of calls
each followed by a synchronize. With --backward the crate's backward kernels
and SDPA's backward are timed too, as a ratio over the forward.

GPU (the issue's setting): bf16, 32 query / 8 KV heads, d = 128, batch 1,
  python benches/peers.py --device cuda --n 8192,32768,131072 --backward
CPU smoke run (what runs without a GPU; f32, small sizes):
  python benches/peers.py --device cpu --n 512 --heads 4 --kv-heads 2 --head-dim 64

Rows whose implementation is unavailable (no torch, no FlexAttention, no CUDA
build of the crate) are printed as skipped with the reason; nothing is faked.
"""

import argparse
import json
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


def time_fn(fn, sync, reps, budget_s=4.0):
    """Median ms of `fn` over up to `reps` calls, each followed by `sync`,
    after one warm-up call (compilation, autotuning); fewer calls (at least
    one) when one takes more than budget_s / reps. Returns (ms, calls)."""
    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    reps = max(1, min(reps, int(budget_s / max(first, 1e-9))))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2], reps


def crate_rows(args, n):
    if args.crate_bin:
        cmd = [args.crate_bin]
    else:
        cmd = ["cargo", "run", "--quiet", "--release"]
        if args.device == "cuda":
            cmd += ["--features", "cuda"]
        cmd += ["--example", "gpu_bench", "--"]
    cmd += ["--n", str(n), "--c", str(args.c), "--s", str(args.s), "--w", str(args.w),
            "--hq", str(args.heads), "--hkv", str(args.kv_heads), "--d", str(args.head_dim),
            "--reps", str(args.reps), "--budget-s", str(args.rep_budget_s)]
    if args.backward:
        cmd.append("--backward")
    if args.device == "cuda":
        cmd.append("--cuda")  # no silent CPU fallback: without a GPU the rows say why
    try:
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        err = getattr(e, "stderr", "") or str(e)
        return [{"impl": name, "skipped": "crate bench failed: " + err.strip()[-300:]}
                for name in ("ksa-crate", "full-causal-crate")]
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    for r in rows:
        if "skipped" not in r and r.get("device") != args.device:
            r["note"] = "ran on " + r.get("device", "?")
    return rows


def torch_rows(args, n):
    names = ["sdpa-full-causal"] + (["sdpa-cudnn-full-causal"] if args.device == "cuda" else []) + ["flex-ksa"]
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        return [{"impl": name, "skipped": "torch not importable: %s" % e} for name in names]
    if args.device == "cuda" and not torch.cuda.is_available():
        return [{"impl": name, "skipped": "no device: torch.cuda.is_available() is False (torch %s)" % torch.__version__}
                for name in names]
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    d, hq, hkv = args.head_dim, args.heads, args.kv_heads
    big = n + args.s * (n // args.c)
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(h, length, grad=False):
        return torch.randn(1, h, length, d, generator=g, dtype=torch.float32).to(dev, dtype).requires_grad_(grad)

    def timed(fn):
        return time_fn(fn, sync, args.reps, args.rep_budget_s)

    rows = []
    q, k, v = rand(hq, n, args.backward), rand(hkv, n, args.backward), rand(hkv, n, args.backward)
    pairs_full = n * (n + 1) // 2
    flops_full = 4 * d * pairs_full * hq
    backends = [("sdpa-full-causal", "FLASH_ATTENTION")]
    if args.device == "cuda":
        backends.append(("sdpa-cudnn-full-causal", "CUDNN_ATTENTION"))
    group = hq // hkv
    for name, backend in backends:
        try:
            import contextlib

            from torch.nn.attention import SDPBackend, sdpa_kernel

            def ctx():
                if args.device == "cuda":
                    return sdpa_kernel([getattr(SDPBackend, backend)])
                return contextlib.nullcontext()

            def sdpa_gqa():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

            def sdpa_expanded():
                # A backend without GQA support: K/V heads repeated to the
                # query heads (what models did before enable_gqa).
                ke, ve = (t.repeat_interleave(group, dim=1) for t in (k, v))
                return F.scaled_dot_product_attention(q, ke, ve, is_causal=True)

            note = ""
            with ctx():
                with torch.no_grad():
                    try:
                        sdpa = sdpa_gqa
                        ms, reps = timed(sdpa)
                    except RuntimeError as e:
                        sdpa, note = sdpa_expanded, "enable_gqa refused (%s): K/V repeated to %d heads, repeat included" % (str(e)[:80], hq)
                        ms, reps = timed(sdpa)
                row = {"impl": name, "device": args.device, "n": n, "slots": n, "ms": ms, "reps": reps,
                       "pairs": pairs_full, "tflops": flops_full / (ms * 1e-3) / 1e12,
                       "backend": backend if args.device == "cuda" else "default"}
                if note:
                    row["note"] = note
                if args.backward:
                    out = sdpa()
                    dout = torch.randn_like(out)
                    bms, breps = timed(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
                    row.update(bwd_ms=bms, bwd_reps=breps, bwd_over_fwd=bms / ms)
                    del out, dout
            rows.append(row)
        except Exception as e:  # noqa: BLE001 - report, don't hide
            rows.append({"impl": name, "skipped": repr(e)[:300]})
    del q, k, v
    try:
        import inspect

        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        q, k, v = rand(hq, big), rand(hkv, big), rand(hkv, big)
        extra = {"_compile": True} if "_compile" in inspect.signature(create_block_mask).parameters else {}
        bm = create_block_mask(ksa_mask_mod(args.c, args.s, args.w), None, None, big, big,
                               device=args.device, **extra)
        flex = torch.compile(flex_attention) if args.device == "cuda" else flex_attention
        with torch.no_grad():
            ms, reps = timed(lambda: flex(q, k, v, block_mask=bm, enable_gqa=True))
        pairs = ksa_pairs(n, args.c, args.s, args.w)
        rows.append({"impl": "flex-ksa", "device": args.device, "n": n, "slots": big, "ms": ms, "reps": reps,
                     "pairs": pairs, "tflops": 4 * d * pairs * hq / (ms * 1e-3) / 1e12,
                     "backend": "torch.compile(flex_attention)" if args.device == "cuda" else "eager"})
        del q, k, v, bm
    except Exception as e:  # noqa: BLE001
        rows.append({"impl": "flex-ksa", "skipped": repr(e)[:300]})
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--n", default="8192,32768,131072", help="comma-separated text lengths, timed in this order")
    p.add_argument("--c", type=int, default=8)
    p.add_argument("--s", type=int, default=1)
    p.add_argument("--w", type=int, default=128)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=7, help="timed calls per measurement (median)")
    p.add_argument("--rep-budget-s", type=float, default=4.0,
                   help="fewer calls (at least one) when one takes more than this over reps")
    p.add_argument("--backward", action="store_true", help="also time the backward (crate and SDPA)")
    p.add_argument("--budget-s", type=float, default=0,
                   help="start no new length after this many seconds (0: no limit); its rows say so")
    p.add_argument("--skip-crate", action="store_true")
    p.add_argument("--crate-bin", help="a built gpu_bench binary (scripts/gpu-kit.sh) instead of cargo run")
    p.add_argument("--json", help="also write all rows to this file at the end")
    p.add_argument("--jsonl", help="append each length's rows to this file as they are measured")
    args = p.parse_args()
    start = time.perf_counter()
    all_rows = []
    print("| n | impl | device | ms | useful TFLOP/s | backward ms (x forward) | note |")
    print("|---|---|---|---|---|---|---|")
    for n in [int(x) for x in args.n.split(",")]:
        if args.budget_s and time.perf_counter() - start > args.budget_s:
            rows = [{"impl": "all", "skipped": "time budget of %.0f s spent before this length" % args.budget_s}]
        else:
            rows = ([] if args.skip_crate else crate_rows(args, n)) + torch_rows(args, n)
        sdpa = next((r for r in rows if r.get("impl") == "sdpa-full-causal" and "ms" in r), None)
        for r in rows:
            r["n"] = n
            if "skipped" in r:
                print("| %d | %s | - | - | - | - | skipped: %s |" % (n, r["impl"], r["skipped"].replace("|", "/")[:160]))
                continue
            note = r.get("note", "")
            if r["impl"] == "ksa-crate" and sdpa:
                note = (note + " " if note else "") + "%.2fx faster than SDPA full causal" % (sdpa["ms"] / r["ms"])
            bwd = "%.3f (%.2fx)" % (r["bwd_ms"], r["bwd_over_fwd"]) if "bwd_ms" in r else "-"
            print("| %d | %s | %s | %.3f | %.4g | %s | %s |" % (n, r["impl"], r.get("device", "?"), r["ms"], r["tflops"], bwd, note))
        sys.stdout.flush()
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        all_rows += rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_rows, f, indent=1)
    # Nothing measured because there is no GPU: say so as the other programs do.
    reasons = [r["skipped"] for r in all_rows if str(r.get("skipped", "")).startswith("no device")]
    if reasons and all("skipped" in r for r in all_rows):
        print("SKIP (%s)" % reasons[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
