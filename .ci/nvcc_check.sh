#!/usr/bin/env bash
# Compile-check every csrc/cuda/*.cu with nvcc (device code for sm_80 and sm_90a), warnings as
# errors.  No GPU and no torch needed: the .cu files include CUDA headers only.
#   usage: bash .ci/nvcc_check.sh [file.cu ...]     (default: all csrc/cuda/*.cu)
#   env:   NVCC (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc)
#          NVCC_CHECK_ARCHS (default: "sm_80 sm_90a")
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [ -z "$NVCC" ] || [ ! -x "$NVCC" ]; then
  echo "nvcc_check: SKIPPED (nvcc not found${NVCC:+: $NVCC})"
  exit 0
fi
ARCHS="${NVCC_CHECK_ARCHS:-sm_80 sm_90a}"
if [ "$#" -gt 0 ]; then FILES=("$@"); else FILES=("$ROOT"/csrc/cuda/*.cu); fi
if [ ! -e "${FILES[0]}" ]; then echo "nvcc_check: no .cu files found"; exit 1; fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
# -Werror all-warnings: every host, device and ptxas warning is an error.  Register spills are
# not warnings by default; -Xptxas -v lets the summary count them (reported, not fatal).
FLAGS=(-O3 -std=c++17 -Werror all-warnings -Xcompiler -fPIC)
JOBS="${NVCC_CHECK_JOBS:-$(nproc 2>/dev/null || echo 2)}"
echo "nvcc_check: $("$NVCC" --version | tail -1)"
start=$(date +%s)
fail=0; n=0; pids=(); names=()
for f in "${FILES[@]}"; do
  for a in $ARCHS; do
    b="$(basename "$f" .cu)_$a"
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 0.2; done
    ( "$NVCC" -arch="$a" "${FLAGS[@]}" -Xptxas -v -c "$f" -o "$TMP/$b.o" >"$TMP/$b.log" 2>&1; echo $? >"$TMP/$b.rc" ) &
    pids+=($!); names+=("$b|$f|$a")
  done
done
for p in "${pids[@]}"; do wait "$p"; done
for entry in "${names[@]}"; do
  IFS='|' read -r b f a <<<"$entry"
  rc="$(cat "$TMP/$b.rc")"; n=$((n + 1))
  if [ "$rc" = "0" ]; then
    nk=$(grep -c "^ptxas info    : Compiling entry" "$TMP/$b.log")
    sp=$(grep -E "bytes spill stores" "$TMP/$b.log" | grep -vc " 0 bytes spill stores, 0 bytes spill loads")
    echo "  ok    $a  ${f#$ROOT/}  ($nk kernels, $sp with register spills)"
  else
    fail=$((fail + 1))
    echo "  FAIL  $a  ${f#$ROOT/}"
    grep -v "^ptxas info\|bytes stack frame" "$TMP/$b.log" | sed 's/^/        /' | head -60
  fi
done
echo "nvcc_check: $((n - fail))/$n compiled ($(( $(date +%s) - start )) s); flags: -arch=<arch> ${FLAGS[*]} -c"
[ "$fail" -eq 0 ]
