# persona-gate: `make demo` runs the main job on a small default model, `make test` passes
# the tests. Each installs what it needs (system packages, the Rust build, the test models).

CARGO ?= cargo
MODELS ?= $(HOME)/.cache/persona-gate/models
BIN := target/release/persona-gate
QWEN05 := $(MODELS)/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf
QWEN15 := $(MODELS)/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf
SMOL := $(MODELS)/SmolLM2-135M-Instruct.Q4_1.gguf
THREADS ?= 2
# The instruction set to build for: native (this CPU's own, AMX left out, checked by running
# a probe), or a fixed level: v4, v3 (= portable: AVX2, runs on any x86-64-v3 CPU), v2.
# An explicit RUSTFLAGS in the environment wins. Plain `cargo build` uses .cargo/config.toml's
# portable x86-64-v3.
ISA ?= native
ifeq ($(origin RUSTFLAGS),undefined)
RUSTFLAGS := $(shell ISA=$(ISA) scripts/cpu-flags.sh)
endif
export RUSTFLAGS

.PHONY: setup build models models-science demo test lint bench bench-ref bench-serve science-directions science-reproduce science-score science-compare clean fuzz

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --release --locked

models:
	@PERSONA_GATE_MODELS=$(MODELS) scripts/fetch-models.sh smol qwen05

models-science:
	@PERSONA_GATE_MODELS=$(MODELS) scripts/fetch-models.sh qwen15

# The main job on the small default model: the paper's preset (E0-E3 and sanity checks) on
# the built-in prompts. Rerunning resumes in runs/demo.
demo: build models
	$(BIN) reproduce --model $(QWEN05) --threads $(THREADS) --out runs/demo
	@echo "report: $(CURDIR)/runs/demo/report.html (open it in a browser)"

# The browser tests (tests/browser.rs, and the report's) fail here rather than skip when
# Chromium or chromedriver is missing, and the Python read-back test (tests/imports.rs) when
# numpy or safetensors is: setup.sh test installs them.
test: build models
	@scripts/setup.sh test
	PERSONA_GATE_REQUIRE_BROWSER=1 PERSONA_GATE_REQUIRE_PYTHON=1 $(CARGO) test --release --locked --no-fail-fast -- --test-threads=1

# cargo deny: licenses, bans (duplicate versions warn) and sources from deny.toml; RustSec
# advisories only where its advisory database (a git repository, not a package registry) can
# be fetched: this project's machines reach package registries alone, so there the check is
# skipped with a message, and it runs wherever the database is reachable.
# check-msrv.sh: the declared rust-version (see the script for what it checks without that
# toolchain; clippy's incompatible_msrv below is part of it).
lint:
	@scripts/setup.sh lint
	$(CARGO) fmt --check
	$(CARGO) clippy --release --all-targets -- -D warnings
	$(CARGO) deny --offline check licenses bans sources
	@if $(CARGO) deny fetch db >/dev/null 2>&1; then $(CARGO) deny check advisories; \
	else echo "lint: advisories skipped: the RustSec advisory database cannot be fetched from here"; fi
	scripts/check-msrv.sh

# persona-gate's throughput beside llama.cpp's own llama-batched-bench, same model, threads,
# shape and instruction set (the reference tools are built once by scripts/build-llama-ref.sh).
bench: build models
	@bin=$$(scripts/build-llama-ref.sh) && \
	$(BIN) bench --model $(QWEN05) --threads $(THREADS) --llama-bin $$bin

# llama.cpp's own llama-bench and llama-batched-bench on the same model and build, raw.
bench-ref: models
	@bin=$$(scripts/build-llama-ref.sh) && \
	$$bin/llama-bench -m $(QWEN05) -t $(THREADS) -p 512 -n 32 -r 3 -fa 0 && \
	$$bin/llama-batched-bench -m $(QWEN05) -t $(THREADS) -c 4096 -b 512 -ub 512 -npp 50 -ntg 32 -npl 1,16,24 -fa off

# persona-gate serve (unsteered, and every client steering its own way) beside llama-server,
# same model, threads, slots and instruction set, one load generator (scripts/bench-serve.sh).
bench-serve: build models
	@MODEL=$(QWEN05) THREADS=$(THREADS) scripts/bench-serve.sh

# Issue 3's science check on Qwen2.5-Coder-1.5B (outside CI: ~10 min on 2 cores): extract
# the refusal direction from the refusal_direction train splits, select a layer on the
# validation splits, and write every candidate's scores.
SHARED ?= ../shared/data
science-directions: build models-science
	@mkdir -p runs
	$(BIN) extract refusal -m $(QWEN15) -t $(THREADS) --positions last --n 32 --seed 0 \
	  --harmful $(SHARED)/refusal_direction/harmful_train.json \
	  --harmless $(SHARED)/refusal_direction/harmless_train.json -o runs/q15-refusal.safetensors
	$(BIN) select -m $(QWEN15) -t $(THREADS) -d runs/q15-refusal.safetensors --n 8 --seed 0 \
	  --harmful-val $(SHARED)/refusal_direction/harmful_val.json \
	  --harmless-val $(SHARED)/refusal_direction/harmless_val.json \
	  --layers 4,6,8,10,12,14,16,18,20,22 --csv runs/q15-select.csv

# Issue 4's science run on Qwen2.5-Coder-1.5B (outside CI; about an hour on 2 cores, rerun to
# resume after an interruption): the preset's coarse grid on StrongREJECT's 60-prompt subset,
# then how well refusal rates and first-token scores agree across conditions. science-score
# runs the same grid in score mode alone (no generation).
# Add SIZE=full for every layer in E2, two window widths and three random seeds.
SIZE ?= demo
science-reproduce: build models-science
	$(BIN) reproduce -m $(QWEN15) -t $(THREADS) --size $(SIZE) --harmful $(SHARED)/strongreject/strongreject_small.csv \
	  --out runs/q15-sr60-$(SIZE)
	$(BIN) agreement runs/q15-sr60-$(SIZE)
science-score: build models-science
	$(BIN) reproduce -m $(QWEN15) -t $(THREADS) --size $(SIZE) --harmful $(SHARED)/strongreject/strongreject_small.csv \
	  --metric score --out runs/q15-sr60-$(SIZE)-score

# Issue 5's comparison on Qwen2.5-Coder-1.5B (outside CI; about an hour on 2 cores when idle):
# F16, Q8_0, Q3_K_M and Q2_K made from the Q4_K_M (cached next to the models, reused by
# hash), then the trimmed spec in docs/results/q15-compare on each. Rerun to resume.
science-compare: build models-science
	$(BIN) quantize -m $(QWEN15) --types F16,Q8_0,Q3_K_M,Q2_K --out-dir $(MODELS)/q15 -t $(THREADS)
	$(BIN) compare -t $(THREADS) --reference $(MODELS)/q15/Qwen2.5-Coder-1.5B-Instruct.F16.gguf \
	  --models $(foreach q,Q8_0 Q3_K_M Q2_K,$(MODELS)/q15/Qwen2.5-Coder-1.5B-Instruct.$(q).gguf) \
	  --spec docs/results/q15-compare/spec.toml -o runs/q15-compare

clean:
	$(CARGO) clean

# Issue 6: fuzz every parser of outside data with cargo-fuzz (libFuzzer, nightly Rust) for
# FUZZ_SECONDS each, from corpora fuzz/seed.sh builds out of the real files. Crashes land in
# fuzz/artifacts/<target>/ and stop the run; per-target logs in fuzz/logs/; numbers in
# fuzz/RESULTS.md.
FUZZ_SECONDS ?= 100
FUZZ_TARGETS ?= prompts safetensors gguf cvec personas spec template group
fuzz: build models
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	fuzz/seed.sh
	$(CARGO) +nightly fuzz build
	@mkdir -p fuzz/logs
	@for t in $(FUZZ_TARGETS); do \
	  echo "fuzz $$t: $(FUZZ_SECONDS) s"; \
	  if ! $(CARGO) +nightly fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) -timeout=10 \
	      -print_final_stats=1 > fuzz/logs/$$t.log 2>&1; then \
	    tail -40 fuzz/logs/$$t.log; echo "fuzz $$t: crash, input in fuzz/artifacts/$$t/"; exit 1; \
	  fi; \
	  grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' fuzz/logs/$$t.log; \
	done
