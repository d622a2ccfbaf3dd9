#!/usr/bin/env python3
"""What a user would run today on a CPU, over the shapes of measure/bench_report.rs.

PyTorch's scaled_dot_product_attention (causal, over n text tokens), dense
SDPA with a boolean KSA mask over the interleaved layout (C=8, S=1, W=128),
and optionally FlexAttention with a KSA mask_mod. Batch 1, 8 query / 2 KV
heads (GQA), head_dim 128, f32 (SDPA causal also in bf16), best of --reps.
Useful GFLOP/s counts 4 * d * allowed pairs * query heads, like the Rust
report. --tsv FILE writes the SDPA causal times for
`bench_report --peers FILE` (benches/compare_cpu.sh runs both).

Needs only torch (and numpy); benches/compare_cpu.sh installs them into a
venv under the user's cache folder.
"""
import argparse
import time

import torch
import torch.nn.functional as F

HQ, HKV, D = 8, 2, 128


def ksa_layout(n, c, s):
    """Per slot of the interleaved sequence: is_text, chunk, index (token or summary j)."""
    full = n // c
    big = n + s * full
    slot = torch.arange(big)
    block = c + s
    chunk = slot // block
    r = slot % block
    is_text = r < c
    index = torch.where(is_text, chunk * c + r, r - c)
    return is_text, chunk, index


def ksa_allowed(is_text, chunk, index, qi, ki, w):
    """The KSA rule (docs/spec.md section 2) for query slots qi and key slots ki (broadcasting)."""
    qt, qc, qx = is_text[qi], chunk[qi], index[qi]
    kt, kc, kx = is_text[ki], chunk[ki], index[ki]
    w0 = torch.clamp(qc - w, min=0)
    text_q = (~kt & (kc < w0)) | (kt & (kc >= w0) & (kx <= qx))
    summ_q = (kt & (kc == qc)) | (~kt & (kc == qc) & (kx <= qx))
    return torch.where(qt, text_q, summ_q)


def best_of(reps, f):
    """Best wall time of reps runs and that run's CPU time (all threads):
    on a shared machine CPU time is the steadier of the two."""
    best = (float("inf"), 0.0)
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        f()
        run = (time.perf_counter() - t, time.process_time() - c)
        best = min(best, run)
    return best


def gflops(pairs, t):
    return 4 * D * pairs * HQ / t / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1024,4096,16384,32768")
    ap.add_argument("--masked-max", type=int, default=16384, help="largest n for dense masked SDPA")
    ap.add_argument("--flex", action="store_true", help="also FlexAttention (compiled) with a KSA mask_mod")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--tsv", help="write n and SDPA causal f32/bf16 wall and CPU seconds here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    about = (f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
             f"{torch.get_num_threads()} threads, batch 1, {HQ}/{HKV} heads, d={D}, best of {args.reps}")
    print(about)
    tsv = open(args.tsv, "w") if args.tsv else None
    if tsv:
        tsv.write(f"# {about}\n")
    a = torch.randn(2048, 2048)
    a @ a
    t, _ = best_of(3, lambda: a @ a)
    print(f"machine f32 matmul (torch, 2048^3): {2 * 2048**3 / t / 1e9:.1f} GFLOP/s\n")
    print("| n | SDPA causal (s) | GFLOP/s | cpu-s | GFLOP/cpu-s | SDPA causal bf16 (s) "
          "| SDPA + KSA bool mask (s) | flex KSA (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in [int(x) for x in args.sizes.split(",")]:
        reps = 1 if n >= 32768 else args.reps
        q = torch.randn(1, HQ, n, D)
        k = torch.randn(1, HKV, n, D)
        v = torch.randn(1, HKV, n, D)
        with torch.no_grad():
            t_causal, c_causal = best_of(reps, lambda: F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True))
        qh, kh, vh = q.bfloat16(), k.bfloat16(), v.bfloat16()
        with torch.no_grad():
            t_bf16, c_bf16 = best_of(reps, lambda: F.scaled_dot_product_attention(
                qh, kh, vh, is_causal=True, enable_gqa=True))
        if tsv:
            tsv.write(f"{n}\t{t_causal}\t{c_causal}\t{t_bf16}\t{c_bf16}\n")
            tsv.flush()
        causal_pairs = n * (n + 1) // 2
        masked, flex = "-", "-"
        is_text, chunk, index = ksa_layout(n, 8, 1)
        big = is_text.numel()
        if n <= args.masked_max:
            idx = torch.arange(big)
            mask = ksa_allowed(is_text, chunk, index, idx[:, None], idx[None, :], 128)
            qb, kb, vb = torch.randn(1, HQ, big, D), torch.randn(1, HKV, big, D), torch.randn(1, HKV, big, D)
            with torch.no_grad():
                tm, _ = best_of(reps, lambda: F.scaled_dot_product_attention(
                    qb, kb, vb, attn_mask=mask, enable_gqa=True))
            masked = f"{tm:.3f}"
            del mask
        if args.flex:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            def mask_mod(b, h, qi, ki):
                return ksa_allowed(is_text, chunk, index, qi, ki, 128)

            bm = create_block_mask(mask_mod, None, None, big, big, device="cpu")
            fa = torch.compile(flex_attention)
            qb, kb, vb = torch.randn(1, HQ, big, D), torch.randn(1, HKV, big, D), torch.randn(1, HKV, big, D)
            with torch.no_grad():
                fa(qb, kb, vb, block_mask=bm, enable_gqa=True)  # compile
                tf, _ = best_of(reps, lambda: fa(qb, kb, vb, block_mask=bm, enable_gqa=True))
            flex = f"{tf:.3f}"
        print(f"| {n} | {t_causal:.4f} | {gflops(causal_pairs, t_causal):.1f} | {c_causal:.3f} | "
              f"{gflops(causal_pairs, c_causal):.1f} | {t_bf16:.4f} | {masked} | {flex} |", flush=True)


if __name__ == "__main__":
    main()
