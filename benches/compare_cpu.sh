#!/usr/bin/env bash
# The crate's CPU attention against PyTorch's CPU SDPA, in one run, on this
# machine: KSA (C=8, S=1, W=128) and full causal against SDPA causal in f32
# and bf16, n = 1K..32K, batch 1, 8 query / 2 KV heads, d = 128, 2 threads.
# Prints the CPU, the load, the kernel variant in use, the f32 FMA peak of
# one core per instruction set, and the side-by-side table with ratios.
#
#   bash benches/compare_cpu.sh            # n = 1K, 2K, 4K, 8K, 16K, 32K
#   bash benches/compare_cpu.sh --quick    # n = 1K, 4K
#   bash benches/compare_cpu.sh --sizes 4096,16384 [--reps 3] [--threads 2]
#   KSA_CPU_ISA=avx2 bash benches/compare_cpu.sh --quick   # force a variant
#
# PyTorch comes from PyPI into a venv under ${XDG_CACHE_HOME:-~/.cache}/ksa-torch
# (once). PyPI's Linux torch wheel is the CUDA build: `pip install --no-deps
# torch` does not import (libtorch_global_deps needs libcudart and the other
# NVIDIA libraries), so its NVIDIA dependencies come too (about 5 GB); it
# runs on the CPU without a GPU.
set -euo pipefail

SIZES=1024,2048,4096,8192,16384,32768
REPS=3
THREADS=2
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) SIZES=1024,4096 ;;
    --sizes) SIZES="$2"; shift ;;
    --reps) REPS="$2"; shift ;;
    --threads) THREADS="$2"; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "compare_cpu: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/ksa-torch"
VENV="$CACHE/venv"
PY="$VENV/bin/python"

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "compare_cpu: installing torch from PyPI into $VENV (once)" >&2
  mkdir -p "$CACHE"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch numpy >&2
  "$PY" -c "import torch" || { echo "compare_cpu: torch does not import" >&2; exit 1; }
fi

cd "$ROOT"
cargo build -q --profile bench --example bench_report  # checks off: what a dependent crate runs

export RAYON_NUM_THREADS="$THREADS"
TSV="$(mktemp)"
trap 'rm -f "$TSV"' EXIT

echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "lscpu: $(lscpu | sed -n 's/^Model name: *//p'), family $(lscpu | sed -n 's/^CPU family: *//p'), model $(lscpu | sed -n 's/^Model: *//p'), $(nproc) CPUs"
echo "ISA flags: $(grep -m1 -o -w -E 'avx2|fma|f16c|avx512f|avx512_bf16|amx_bf16|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "load before: $(uptime | sed 's/.*load average: //')"
echo
"$PY" benches/peers_cpu.py --threads "$THREADS" --sizes "$SIZES" --reps "$REPS" --masked-max 0 --tsv "$TSV"
echo
echo "load between: $(uptime | sed 's/.*load average: //')"
"${CARGO_TARGET_DIR:-target}/release/examples/bench_report" --sizes "$SIZES" --reps "$REPS" --bf16 --peers "$TSV"
echo
echo "load after: $(uptime | sed 's/.*load average: //')"
