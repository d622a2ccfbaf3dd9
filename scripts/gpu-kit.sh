#!/usr/bin/env bash
# The GPU check prepared ahead (docs/gpu.md): built and packed here, run in a
# few minutes on a GPU host that has no Rust toolchain and no network.
#
#   bash scripts/gpu-kit.sh pack          # here: build with --features cuda, strip, pack
#   bash scripts/gpu-kit.sh run OUTDIR    # there: environment, steps a-c, report (d)
#
# pack: release binaries of every GPU check (the GPU test binaries cuda_gpu,
#   cache_decode, cuda_emu_decode; measure/gpu_check.rs; measure/gpu_bench.rs),
#   built like .ci/run builds them (nvcc 13.0 from scripts/cuda-toolchain.sh,
#   stub CUDA libraries from scripts/cuda-libs.sh, CUDA_COMPUTE_CAP=80 so
#   candle's kernels are compute_80 PTX that sm_80 and sm_90 both JIT),
#   stripped and packed with MANIFEST.json (commit, sizes, sha256, build flags,
#   the libraries they load) into ${KSA_GPU_KIT_DIR:-.gpu-kit}/ (git-ignored),
#   at most 60 MiB. Prints the size.
# run: reports what it finds (GPU, driver, libcuda, the CUDA 13 libraries of
#   the driver and of the Python nvidia-* wheels, tools), points the binaries
#   at those libraries (LD_LIBRARY_PATH; unversioned names they were linked
#   against are symlinked to the versioned files), then runs each step under
#   `timeout` with its budget; a failing or timed-out step is recorded and the
#   next one runs. Without a GPU every GPU step ends `SKIP (no device: REASON)`.
#   OUTDIR gets report.md, results.json and log.txt (every step's output).
#   Step budgets (seconds, 465 in all; planned for one H200):
#     env 10 | a: tests 60, gpu_check correct 100 | b: memcheck 45, racecheck 60
#     | c: timing table 150, decode 30 | d: report 10
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
KIT="${KSA_GPU_KIT_DIR:-$ROOT/.gpu-kit}"
TARBALL="ksa-gpu-kit.tar.xz"
MAX_BYTES=$((60 * 1024 * 1024))
BINS="cuda_gpu cache_decode cuda_emu_decode gpu_check gpu_bench"

die() {
  echo "gpu-kit: $*" >&2
  exit 1
}

pack() {
  set -e
  local start=$SECONDS
  cd "$ROOT"
  eval "$(bash scripts/cuda-toolchain.sh)"
  # 80, not the machine's: compute_80 PTX runs on sm_80 and (JIT) sm_90;
  # CUDA_COMPUTE_CAP=90 would give sm_90a PTX that runs on sm_90 alone.
  export CUDA_COMPUTE_CAP=80 CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
  eval "$(bash scripts/cuda-libs.sh)"
  STAGE="$(mktemp -d)"
  trap 'rm -rf "$STAGE"' EXIT
  local stage="$STAGE"
  mkdir -p "$stage/bin" "$KIT"
  echo "gpu-kit: cargo build --release --features cuda (tests and measure programs)" >&2
  cargo build --release --features cuda --message-format=json-render-diagnostics \
    --test cuda_gpu --test cache_decode --test cuda_emu_decode \
    --example gpu_check --example gpu_bench >"$stage/cargo.json"
  python3 - "$stage" $BINS <<'EOF'
import json, shutil, sys
stage, names = sys.argv[1], sys.argv[2:]
found = {}
for line in open(stage + "/cargo.json"):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in names:
        found[m["target"]["name"]] = m["executable"]
missing = [n for n in names if n not in found]
if missing:
    sys.exit("gpu-kit: no executable for " + ", ".join(missing))
for n, path in found.items():
    shutil.copy(path, stage + "/bin/" + n)
    print("%s %s" % (n, path))
EOF
  for b in $BINS; do
    cp "$stage/bin/$b" "$stage/$b.unstripped"
    strip --strip-all "$stage/bin/$b"
  done
  python3 - "$stage" "$ROOT" $BINS <<'EOF' >"$stage/MANIFEST.json"
import hashlib, json, os, subprocess, sys, time
stage, root, names = sys.argv[1], sys.argv[2], sys.argv[3:]
def out(*cmd):
    try:
        return subprocess.run(cmd, cwd=root, capture_output=True, text=True).stdout.strip()
    except OSError as e:
        return "unavailable: %s" % e
def needed(path):
    return [l.split("[")[1].rstrip("]") for l in out("readelf", "-d", path).splitlines() if "(NEEDED)" in l]
def newest(path, prefix):
    """The newest symbol version (GLIBC_, GLIBCXX_) the binary asks of the host."""
    import re
    vs = set(re.findall(prefix + r"_([0-9.]+)", out("objdump", "-T", path)))
    return prefix + "_" + max(vs, key=lambda v: [int(x) for x in v.split(".")]) if vs else None
files = []
for n in names:
    p = os.path.join(stage, "bin", n)
    files.append({"name": n, "kind": "test" if n in ("cuda_gpu", "cache_decode", "cuda_emu_decode") else "example",
                  "bytes": os.path.getsize(p), "unstripped_bytes": os.path.getsize(os.path.join(stage, n + ".unstripped")),
                  "sha256": hashlib.sha256(open(p, "rb").read()).hexdigest(), "needed": needed(p),
                  "host_needs": [newest(p, "GLIBC"), newest(p, "GLIBCXX")]})
print(json.dumps({
    "commit": out("git", "rev-parse", "HEAD"),
    "dirty": bool(out("git", "status", "--porcelain", "--untracked-files=no")),
    "packed_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "rustc": out("rustc", "-V"), "nvcc": out("nvcc", "--version").splitlines()[-1:],
    "build": {"profile": "release", "features": ["cuda"], "CUDA_COMPUTE_CAP": os.environ.get("CUDA_COMPUTE_CAP"),
              "crate_ptx": "kernels/*.cu -> nvcc --ptx -O3 -arch=compute_80, embedded, JIT-compiled by the driver at first use",
              "linked_against": "stub CUDA libraries (scripts/cuda-libs.sh) and libcudart 13.0.96; strip --strip-all"},
    "files": files}, indent=1))
EOF
  rm -f "$KIT/$TARBALL" "$KIT/MANIFEST.json"
  cp "$stage/MANIFEST.json" "$KIT/MANIFEST.json"
  # The binaries share most of their bytes (candle's PTX, the 32 MB .nv_fatbin
  # of candle-kernels' libmoe.a): one xz stream whose dictionary spans the
  # whole tar stores them once. preset 1 with a 256 MiB dictionary: ~9 MB from
  # ~230 MB in ~40 s and 1.4 GB of memory on this project's 2-core machine
  # (preset 6 with xz's default dictionary: 29 MB in 7 minutes).
  tar -C "$stage" -cf - bin MANIFEST.json | xz -T1 --lzma2=preset=1,dict=256MiB >"$KIT/$TARBALL"
  local bytes
  bytes=$(($(stat -c %s "$KIT/$TARBALL") + $(stat -c %s "$KIT/MANIFEST.json")))
  echo "gpu-kit: packed $KIT ($bytes bytes, $((bytes / 1024 / 1024)) MiB; stripped binaries: $(du -cb "$stage"/bin/* | tail -1 | cut -f1) bytes) in $((SECONDS - start)) s"
  [ "$bytes" -le "$MAX_BYTES" ] || die "kit is $bytes bytes, over the 60 MiB limit"
}

# ---------------------------------------------------------------- run ----
OUT="" WORK="" LOG=""

log() { echo "$*" | tee -a "$LOG"; }

# Adds one line to steps.jsonl: name, budget, status, seconds, reason.
record() {
  python3 -c 'import json,sys; print(json.dumps(dict(zip(["step","budget_s","status","seconds","reason"], [sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), sys.argv[5]]))))' \
    "$@" >>"$WORK/steps.jsonl"
}

# step NAME BUDGET_S CMD...: runs CMD under `timeout`, stdout to
# $WORK/NAME.out, both streams (capped) into log.txt. Status: ok, fail,
# timeout, or skip when the output says SKIP / "skipped" and nothing failed.
step() {
  local name=$1 budget=$2
  shift 2
  log "== step $name (budget ${budget} s): $*"
  local t0 rc status reason=""
  t0=$(date +%s.%N)
  timeout --kill-after=5 "$budget" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err"
  rc=$?
  local secs
  secs=$(python3 -c "import sys; print('%.1f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$t0" "$(date +%s.%N)")
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    status=timeout reason="killed after its ${budget} s budget"
  elif [ $rc -ne 0 ]; then
    status=fail reason="exit status $rc"
  elif grep -qE 'SKIP[: (]+no (CUDA )?device' "$WORK/$name.out" "$WORK/$name.err"; then
    # The program found no device and said why (the GPU tests: "SKIP: no CUDA
    # device (...)"; gpu_check, gpu_bench, peers.py: "SKIP (no device: ...)").
    status=skip
    reason=$(grep -hE 'SKIP[: (]+no (CUDA )?device' "$WORK/$name.out" "$WORK/$name.err" | head -n 1 | cut -c1-300)
  else
    status=ok
  fi
  for f in out err; do
    if [ -s "$WORK/$name.$f" ]; then
      echo "-- $name std$f:" >>"$LOG"
      # At most 1 MB per stream: a sanitizer that finds something can print a lot.
      if [ "$(stat -c %s "$WORK/$name.$f")" -gt 1000000 ]; then
        head -c 500000 "$WORK/$name.$f" >>"$LOG"
        echo "... [cut] ..." >>"$LOG"
        tail -c 500000 "$WORK/$name.$f" >>"$LOG"
      else
        cat "$WORK/$name.$f" >>"$LOG"
      fi
    fi
  done
  record "$name" "$budget" "$status" "$secs" "$reason"
  log "== $name: $status${reason:+ ($reason)} in $secs s"
  if [ "$status" = skip ]; then echo "$name: $reason"; fi
  return 0
}

# A step that cannot start: recorded as skip with the reason.
skip_step() {
  local name=$1 budget=$2 reason=$3
  record "$name" "$budget" skip 0 "SKIP ($reason)"
  log "== step $name (budget ${budget} s)"
  log "$name: SKIP ($reason)"
}

# The directories of the Python nvidia-* wheels' shared libraries.
wheel_lib_dirs() {
  python3 - <<'EOF' 2>/dev/null || true
import glob, os
try:
    import nvidia
    bases = list(nvidia.__path__)
except Exception:
    bases = []
dirs = set()
for base in bases:
    for so in glob.glob(os.path.join(base, "**", "lib*.so*"), recursive=True):
        # Never a stubs folder: a stub libcuda would hide the driver's.
        if "stubs" not in so.split(os.sep):
            dirs.add(os.path.dirname(so))
print(":".join(sorted(dirs)))
EOF
}

# Makes every library the binaries need loadable: the wheels' lib dirs on
# LD_LIBRARY_PATH, and for names still missing (the binaries were linked
# against unversioned stubs: libcuda.so, libcublas.so, ...) a symlink in
# $WORK/libs to the versioned file found in the driver's, the toolkit's or the
# wheels' directories.
setup_libs() {
  local wheels shim="$WORK/libs"
  mkdir -p "$shim"
  wheels="$(wheel_lib_dirs)"
  export LD_LIBRARY_PATH="$shim${wheels:+:$wheels}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  local search="${wheels//:/ } /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib"
  local lib stem cand
  for lib in $(ldd "$WORK"/kit/bin/* 2>/dev/null | awk '/=> not found/ {print $1}' | sort -u); do
    stem="${lib%%.so*}"
    cand=""
    for d in $search; do
      cand="$(ls -1 "$d/$stem".so* 2>/dev/null | sort -V | tail -n 1)"
      [ -n "$cand" ] && break
    done
    if [ -z "$cand" ]; then
      cand="$(ldconfig -p 2>/dev/null | awk -v s="$stem.so" '$1 ~ "^"s {print $NF; exit}')"
    fi
    if [ -n "$cand" ]; then
      ln -sf "$cand" "$shim/$lib"
      log "libs: $lib -> $cand"
    else
      log "libs: $lib not found"
    fi
  done
  MISSING_LIBS="$(ldd "$WORK"/kit/bin/* 2>/dev/null | awk '/=> not found/ {print $1}' | sort -u | tr '\n' ' ')"
}

# Writes the environment report program to $WORK/env.py (run as step env).
write_env_report() {
  cat >"$WORK/env.py" <<'EOF'
import json, os, re, shutil, subprocess, sys
def run(*cmd):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (p.stdout + p.stderr).strip()
    except Exception as e:
        return "unavailable: %s" % e
env = {}
smi = shutil.which("nvidia-smi")
if smi:
    env["gpu"] = run(smi, "--query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm,power.limit", "--format=csv,noheader")
    m = re.search(r"CUDA Version: *([0-9.]+)", run(smi))
    env["driver_cuda_version"] = m.group(1) if m else None
else:
    env["gpu"] = "nvidia-smi not found"
libcuda = [l.split("=>")[-1].strip() for l in run("ldconfig", "-p").splitlines() if "libcuda.so" in l]
env["libcuda"] = [p + " -> " + os.path.realpath(p) for p in libcuda]
env["ld_library_path"] = os.environ.get("LD_LIBRARY_PATH", "")
bin_dir = os.path.dirname(sys.argv[1]) + "/bin"
env["kit_libraries"] = sorted({
    l.split("=>")[0].strip() + " => " + os.path.realpath(l.split("=>")[1].split("(")[0].strip())
    for l in run("ldd", bin_dir + "/gpu_check").splitlines()
    if "=>" in l and "/" in l and re.search(r"lib(cuda|nvrtc|cublas|cublasLt|curand|cudart)\b", l)})
env["python"] = run(sys.executable, "--version")
env["python_packages"] = run(sys.executable, "-c",
    "import importlib\nfor m in ('torch','triton','cupy'):\n  try:\n    x=importlib.import_module(m); print(m, x.__version__, getattr(getattr(x,'version',None),'cuda','') or '')\n  except Exception as e: print(m, 'unavailable:', type(e).__name__)").splitlines()
env["nvidia_wheels"] = [l for l in run(sys.executable, "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check").splitlines()
                        if l.lower().startswith("nvidia")]
env["tools"] = {t: (run(t, "--version").splitlines() or ["?"])[-1] if shutil.which(t) else "not found"
                for t in ("nvcc", "compute-sanitizer", "ncu")}
cpu = [l.split(":", 1)[1].strip() for l in run("lscpu").splitlines() if l.startswith("Model name")]
env["cpu"] = cpu[0] if cpu else "?"
env["kit"] = json.load(open(sys.argv[1]))
print(json.dumps(env, indent=1))
EOF
}

run_kit() {
  OUT=$1
  mkdir -p "$OUT"
  OUT="$(cd "$OUT" && pwd)"
  LOG="$OUT/log.txt"
  : >"$LOG"
  WORK="$(mktemp -d)"
  trap 'rm -rf "$WORK"' EXIT
  local start=$SECONDS
  [ -f "$KIT/$TARBALL" ] || die "no kit at $KIT/$TARBALL: run 'bash scripts/gpu-kit.sh pack' first (and carry .gpu-kit to the GPU host)"
  mkdir -p "$WORK/kit"
  tar -C "$WORK/kit" -xJf "$KIT/$TARBALL" 2>/dev/null \
    || python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$KIT/$TARBALL" "$WORK/kit" \
    || die "cannot unpack $KIT/$TARBALL"
  log "gpu-kit run: kit $(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(m["commit"][:12], "dirty" if m["dirty"] else "", m["packed_utc"])' "$WORK/kit/MANIFEST.json")"
  export CUDA_CACHE_PATH="$WORK/nv-jit-cache" CUDA_CACHE_MAXSIZE=1073741824 PYTHONUNBUFFERED=1
  MISSING_LIBS=""
  setup_libs
  write_env_report
  step env 10 python3 "$WORK/env.py" "$WORK/kit/MANIFEST.json"
  cp "$WORK/env.out" "$WORK/env.json" 2>/dev/null || echo '{}' >"$WORK/env.json"

  # Is there a device? The binaries decide for themselves (Device::new_cuda);
  # this only names the reason for steps that cannot even start.
  local nodev=""
  if ! command -v nvidia-smi >/dev/null; then
    nodev="no device: nvidia-smi not found"
  elif ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    nodev="no device: nvidia-smi lists no GPU"
  fi
  [ -n "$nodev" ] && log "$nodev"
  local b="$WORK/kit/bin"
  if [ -n "$MISSING_LIBS" ]; then
    local why="${nodev:-no device}; libraries not found: ${MISSING_LIBS% }"
    for s in a1-cuda_gpu:30 a2-cache_decode:20 a3-decode_kernels:10 a4-gpu_check:100 \
      b1-memcheck:45 b2-racecheck:60 c1-timing:150 c2-decode:30; do
      skip_step "${s%%:*}" "${s##*:}" "$why"
    done
  else
    # a. correctness on hardware
    step a1-cuda_gpu 30 "$b/cuda_gpu" --nocapture --test-threads 1
    step a2-cache_decode 20 "$b/cache_decode" --nocapture --test-threads 1 cuda_bf16_cache_equals_full_forward
    step a3-decode_kernels 10 "$b/cuda_emu_decode" --nocapture --test-threads 1 gpu::equals_cpu_on_gpu
    step a4-gpu_check 100 "$b/gpu_check" correct
    # b. compute-sanitizer on a small forward + backward + decode
    if command -v compute-sanitizer >/dev/null; then
      step b1-memcheck 45 compute-sanitizer --tool memcheck --error-exitcode 99 "$b/gpu_check" sanitize
      step b2-racecheck 60 compute-sanitizer --tool racecheck --error-exitcode 99 "$b/gpu_check" sanitize
    elif [ -n "$nodev" ]; then
      # Nothing to sanitize without a device: still run the program, which says SKIP.
      step b1-memcheck 45 "$b/gpu_check" sanitize
      skip_step b2-racecheck 60 "$nodev (and compute-sanitizer not found)"
    else
      skip_step b1-memcheck 45 "compute-sanitizer not found"
      skip_step b2-racecheck 60 "compute-sanitizer not found"
    fi
    # c. timing: the crate against PyTorch SDPA and FlexAttention, 32K first
    # (the full-causal target), then 128K (the KSA targets), then 8K.
    step c1-timing 150 python3 "$ROOT/benches/peers.py" --device cuda --n 32768,131072,8192 \
      --crate-bin "$b/gpu_bench" --backward --budget-s 140 --jsonl "$WORK/timing.jsonl"
    step c2-decode 30 "$b/gpu_check" decode
  fi
  # d. the report
  step d-report 10 python3 "$ROOT/scripts/gpu_kit_report.py" "$WORK" "$OUT"
  log "gpu-kit run: done in $((SECONDS - start)) s; $OUT: $(ls "$OUT" | tr '\n' ' ')"
}

case "${1:-}" in
  pack) pack ;;
  run)
    [ $# -eq 2 ] || die "usage: bash scripts/gpu-kit.sh run OUTDIR"
    run_kit "$2"
    ;;
  *) die "usage: bash scripts/gpu-kit.sh pack | run OUTDIR" ;;
esac
