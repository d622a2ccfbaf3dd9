#!/usr/bin/env bash
# Install a pinned CUDA nvcc from PyPI wheels into a cache folder and print the
# environment to use it:
#
#   eval "$(bash scripts/cuda-toolchain.sh)"
#
# - Folder: ${KSA_CUDA_DIR:-$HOME/.cache/ksa-cuda}. Idempotent: if nvcc already
#   runs from there, nothing is downloaded.
# - All wheels go in ONE `pip install --target` into a fresh folder: a second
#   `pip install --target` into an existing folder silently skips files that
#   already exist (the wheels share the `nvidia/cu13` tree), leaving a broken
#   toolchain.
# - The real bin dir is $DIR/nvidia/cu13/bin; do not symlink nvcc elsewhere:
#   nvcc finds its headers and nvvm relative to its own location.
# - nvcc 13.0 emits PTX `.version 9.0`; gcc 12 works as the host compiler
#   (only needed for `nvcc --ptx` preprocessing of .cu files).
# Only the export lines go to stdout; everything else goes to stderr.
set -euo pipefail

DIR="${KSA_CUDA_DIR:-$HOME/.cache/ksa-cuda}"
BIN="$DIR/nvidia/cu13/bin"
PKGS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)
STAMP="$DIR/.ksa-cuda-installed"
WANT="${PKGS[*]}"

installed() {
  [ -x "$BIN/nvcc" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] \
    && "$BIN/nvcc" --version >/dev/null 2>&1
}

if installed; then
  echo "cuda-toolchain: nvcc already installed in $DIR" >&2
else
  PY="${PYTHON:-$(command -v python3 || command -v python)}"
  mkdir -p "$(dirname "$DIR")"
  TMP="$(mktemp -d "${DIR%/}.tmp.XXXXXX")"
  trap 'rm -rf "$TMP"' EXIT
  echo "cuda-toolchain: installing ${WANT} into $DIR" >&2
  "$PY" -m pip install --disable-pip-version-check --no-input --no-deps \
    --target "$TMP" "${PKGS[@]}" 1>&2
  chmod +x "$TMP/nvidia/cu13/bin/"* 2>/dev/null || true
  echo "$WANT" >"$TMP/.ksa-cuda-installed"
  rm -rf "$DIR"
  mkdir -p "$(dirname "$DIR")"
  mv "$TMP" "$DIR"
  trap - EXIT
  if ! installed; then
    echo "cuda-toolchain: nvcc does not run after install ($BIN/nvcc)" >&2
    exit 1
  fi
fi

echo "cuda-toolchain: $("$BIN/nvcc" --version | tail -n 2 | head -n 1)" >&2
echo "export CUDA_HOME=\"$DIR/nvidia/cu13\""
echo "export PATH=\"$BIN:\$PATH\""
