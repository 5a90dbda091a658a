#!/usr/bin/env bash
# `make bench-serve`: persona-gate serve, unsteered and with every client steering its own
# way, beside llama.cpp's llama-server unsteered, on the same model, threads, slots, context
# per slot and instruction set (llama-server from scripts/build-llama-ref.sh), driven by the
# same load generator (scripts/bench-serve.py: greedy chat requests at 1, 4 and 16 clients).
# Prints the CPU, one JSON line per run and level, and the README's table; the raw lines are
# kept in runs/bench-serve/.
#
# Usage: MODEL=FILE.gguf [THREADS=2] [PARALLEL=16] [CTX=1024] [REQUESTS=4] [MAX_TOKENS=64]
#        [CLIENTS=1,4,16] [ROUNDS=2] [KERNELS="default invariant llama"] scripts/bench-serve.sh
# Each round runs every server once, in the same order; the table gives the median over the
# rounds and the range (noise on a shared VM is large: compare only rows of one table).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${MODEL:?MODEL=FILE.gguf}
threads=${THREADS:-2}
np=${PARALLEL:-16}
ctx=${CTX:-1024}
requests=${REQUESTS:-4}
max_tokens=${MAX_TOKENS:-64}
clients=${CLIENTS:-1,4,16}
rounds=${ROUNDS:-2}
kernels_list=${KERNELS:-default invariant llama}
pg=target/release/persona-gate
out=runs/bench-serve
mkdir -p "$out"
llama_bin=$(LLAMA_REF_SERVER=1 scripts/build-llama-ref.sh)
dir="$out/refusal.safetensors"
[ -f "$dir" ] || "$pg" extract refusal -m "$model" -t "$threads" -o "$dir" >&2

echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; threads $threads; rustflags: ${RUSTFLAGS:-}" | tee "$out/cpu.txt"
up() {
  for _ in $(seq 1200); do
    curl -sf "$1/health" >/dev/null 2>&1 && return 0
    kill -0 "$2" 2>/dev/null || { echo "bench-serve: the server exited" >&2; return 1; }
    sleep 0.25
  done
  echo "bench-serve: the server at $1 did not come up" >&2
  return 1
}
gen() { python3 scripts/bench-serve.py "$@" --model bench --clients "$clients" --requests "$requests" --max-tokens "$max_tokens"; }
: > "$out/results.jsonl"

# Per round: persona-gate with serve's default kernels (rowwise: row-invariant, a request's
# text is the same bit for bit whatever else is decoded), with the tiled invariant ones of
# the other commands, with llama.cpp's own (--kernels llama: steering stays per request, the
# last bits then depend on the batch), each unsteered and steered; then llama-server.
for round in $(seq "$rounds"); do
  for kernels in $kernels_list; do
    suffix=""; flag=()
    [ "$kernels" = default ] || { suffix="-$kernels-kernels"; flag=(--kernels "$kernels"); }
    "$pg" serve -m "$model" -t "$threads" --parallel "$np" --ctx "$ctx" --port 8391 "${flag[@]}" \
      --directions "$dir" --max-tokens "$max_tokens" --alias bench 2>"$out/persona-gate$suffix.log" &
    pid=$!
    trap 'kill $pid 2>/dev/null || true' EXIT
    up http://127.0.0.1:8391 $pid
    name=$(curl -sf http://127.0.0.1:8391/v1/directions | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["name"])')
    gen http://127.0.0.1:8391 --label "persona-gate$suffix" | tee -a "$out/results.jsonl"
    gen http://127.0.0.1:8391 --label "persona-gate$suffix-steered" --steer "$name" | tee -a "$out/results.jsonl"
    kill -TERM $pid; wait $pid || true
  done
  "$llama_bin/llama-server" -m "$model" -t "$threads" -np "$np" -c $((np * ctx)) -fa off \
    --port 8392 --alias bench 2>"$out/llama-server.log" &
  pid=$!
  up http://127.0.0.1:8392 $pid
  gen http://127.0.0.1:8392 --label llama-server | tee -a "$out/results.jsonl"
  kill -TERM $pid; wait $pid || true
done
trap - EXIT

python3 - "$out/results.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in rows:
    by.setdefault((r["label"], r["clients"]), []).append(r)
def med(rs, k):
    return statistics.median(r[k] for r in rs)
labels = ["llama-server"] + [l for l in dict.fromkeys(r["label"] for r in rows) if l != "llama-server"]
print("| clients | server | tok/s (median, range) | req/s | latency p50 / p90 (s) | errors | vs llama-server | steered vs unsteered |")
print("|---:|---|---:|---:|---:|---:|---:|---:|")
for c in sorted({r["clients"] for r in rows}):
    ref = by.get(("llama-server", c))
    for lab in labels:
        rs = by.get((lab, c))
        if not rs:
            continue
        t = med(rs, "tok_per_s")
        un = by.get((lab.removesuffix("-steered"), c))
        vs = f'{t / med(ref, "tok_per_s"):.2f}x' if ref and lab != "llama-server" else ""
        st = f'{t / med(un, "tok_per_s"):.2f}x' if un and lab.endswith("-steered") else ""
        lo, hi = min(r["tok_per_s"] for r in rs), max(r["tok_per_s"] for r in rs)
        print(f'| {c} | {lab} | {t:.1f} ({lo}–{hi}) | {med(rs, "req_per_s"):.2f} | {med(rs, "latency_p50_s"):.2f} / {med(rs, "latency_p90_s"):.2f} | {sum(r["errors"] for r in rs)} | {vs} | {st} |')
PY
