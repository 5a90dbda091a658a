# persona-gate: `make demo` runs the main job on a small default model, `make test` passes
# the tests. Each installs what it needs (system packages, the Rust build, the test models).

CARGO ?= cargo
MODELS ?= $(HOME)/.cache/persona-gate/models
BIN := target/release/persona-gate
QWEN05 := $(MODELS)/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf
QWEN15 := $(MODELS)/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf
SMOL := $(MODELS)/SmolLM2-135M-Instruct.Q4_1.gguf
THREADS ?= 2

.PHONY: setup build models models-science demo test lint bench bench-ref science-directions clean

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --release --locked

models:
	@PERSONA_GATE_MODELS=$(MODELS) scripts/fetch-models.sh smol qwen05

models-science:
	@PERSONA_GATE_MODELS=$(MODELS) scripts/fetch-models.sh qwen15

demo: build models
	$(BIN) demo --model $(QWEN05) --threads $(THREADS)

test: build models
	$(CARGO) test --release --locked -- --test-threads=1

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --release --all-targets -- -D warnings

bench: build models
	$(BIN) bench --model $(QWEN05) --threads $(THREADS)

# llama.cpp's own llama-bench / llama-batched-bench on the same model, for the README table.
bench-ref: models
	@bin=$$(scripts/build-llama-ref.sh) && \
	$$bin/llama-bench -m $(QWEN05) -t $(THREADS) -p 512 -n 0 -r 3 && \
	$$bin/llama-batched-bench -m $(QWEN05) -t $(THREADS) -c 4096 -b 512 -ub 512 -npp 128 -ntg 64 -npl 1,4,16 --kv-unified

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

clean:
	$(CARGO) clean
