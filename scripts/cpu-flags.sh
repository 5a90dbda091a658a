#!/usr/bin/env bash
# Prints the RUSTFLAGS that `make` builds persona-gate (and, through llama-cpp-sys-2, llama.cpp)
# with: the instruction set of the CPU building it, AMX left out.
#
#   ISA=native   (default) this CPU's own set: x86-64-v4 + the AVX-512 extensions llama.cpp
#                uses (VNNI, BF16, VBMI) where /proc/cpuinfo lists them, else x86-64-v3, ...
#   ISA=v4 | v3 | v2   a fixed x86-64 level (v3 = AVX2/FMA/F16C/BMI2 is the portable build:
#                every x86 machine of the last decade runs it)
#
# Why not `-C target-cpu=native`: llama-cpp-sys-2 turns that into GGML_NATIVE, which adds AMX
# where a CPU lists it, and some VMs list AMX whose kernels crash. A level plus named features
# maps to explicit GGML_AVX* options instead (see ../shared/notes/cpu-build.md).
#
# Each candidate is checked by compiling and running a tiny program that executes the
# level's signature instructions: a VM that lists AVX-512 but faults on it falls back to the
# next level instead of producing a binary that dies with SIGILL. Chosen by measurement: on
# the AVX-512 machines measured (README, "Benchmark"), the AVX-512 build is the faster one.
# Non-x86 machines get no flags (cargo's defaults; llama.cpp picks NEON/SVE itself).
set -euo pipefail

isa="${ISA:-native}"
case "$(uname -m)" in
  x86_64|amd64) ;;
  *) exit 0 ;;
esac

flags=""
if [ -r /proc/cpuinfo ]; then
  flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
elif command -v sysctl >/dev/null; then
  flags=" $(sysctl -n machdep.cpu.features machdep.cpu.leaf7_features 2>/dev/null | tr 'A-Z.' 'a-z_') "
fi
has() { local want; for want in "$@"; do case "$flags" in *" $want "*) ;; *) return 1 ;; esac; done; }

# Compiles and runs a probe with the given -march/-m flags; succeeds if it runs.
probe() {
  local cc="${CC:-cc}" dir
  command -v "$cc" >/dev/null || return 0   # no compiler to probe with: trust cpuinfo
  dir=$(mktemp -d)
  cat > "$dir/p.c" <<'EOF'
#include <immintrin.h>
#include <stdio.h>
int main(void) {
  volatile float f[16] = {1};
  __m256 a = _mm256_loadu_ps((const float *)f);
  a = _mm256_fmadd_ps(a, a, a);
#if defined(__AVX512F__)
  __m512 b = _mm512_set1_ps(f[0]);
  b = _mm512_fmadd_ps(b, b, b);
  a = _mm256_add_ps(a, _mm512_castps512_ps256(b));
#endif
#if defined(__AVX512VNNI__)
  __m512i z = _mm512_set1_epi32(1);
  z = _mm512_dpbusd_epi32(z, z, z);
  a = _mm256_add_ps(a, _mm256_set1_ps((float)_mm512_reduce_add_epi32(z)));
#endif
#if defined(__AVX512BF16__)
  __m512bh h = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1.0f), _mm512_set1_ps(2.0f));
  a = _mm256_add_ps(a, _mm512_castps512_ps256(_mm512_dpbf16_ps(_mm512_setzero_ps(), h, h)));
#endif
  _mm256_storeu_ps((float *)f, a);
  printf("%d\n", (int)f[0]);
  return 0;
}
EOF
  local ok=1
  if "$cc" -O1 "$@" "$dir/p.c" -o "$dir/p" 2>/dev/null; then
    "$dir/p" >/dev/null 2>&1 || ok=0
  fi
  rm -rf "$dir"
  [ "$ok" = 1 ]
}

v4() {
  local f="+avx512f,+avx512bw,+avx512vl,+avx512dq,+avx512cd" m="-march=x86-64-v4"
  has avx512_vnni && { f="$f,+avx512vnni"; m="$m -mavx512vnni"; }
  has avx512_bf16 && { f="$f,+avx512bf16"; m="$m -mavx512bf16"; }
  has avx512vbmi && { f="$f,+avx512vbmi"; m="$m -mavx512vbmi"; }
  # shellcheck disable=SC2086
  probe $m || return 1
  echo "-C target-cpu=x86-64-v4 -C target-feature=$f"
}
v3() {
  probe -march=x86-64-v3 || return 1
  echo "-C target-cpu=x86-64-v3"
}

case "$isa" in
  native)
    if has avx512f avx512bw avx512vl avx512dq avx512cd && v4; then :
    elif has avx2 fma f16c bmi2 && v3; then :
    else echo "-C target-cpu=x86-64-v2"
    fi ;;
  v4) v4 || { echo "cpu-flags: ISA=v4 does not run on this CPU" >&2; exit 1; } ;;
  v3|portable) echo "-C target-cpu=x86-64-v3" ;;
  v2) echo "-C target-cpu=x86-64-v2" ;;
  *) echo "cpu-flags: unknown ISA '$isa' (native, v4, v3, portable, v2)" >&2; exit 1 ;;
esac
