#!/usr/bin/env bash
# Builds the fuzz corpora in fuzz/corpus/<target>/ (gitignored) from real files:
# the prompt sets in ../shared/data and src/prompts/builtin, the built-in personas, direction
# and control-vector files written by the persona-gate binary on SmolLM2 (when the binary and
# the model are there), and small crafted GGUF / safetensors files. Inputs are cut to a few
# KB so libFuzzer's max_len stays small. Needs python3.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared/data}
MODELS=${MODELS:-$HOME/.cache/persona-gate/models}
BIN=${BIN:-target/release/persona-gate}
OUT=fuzz/corpus
mkdir -p "$OUT"/{prompts,safetensors,gguf,cvec,personas,spec,template,group}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Direction and control-vector files from the real binary (a few seconds on SmolLM2).
if [ -x "$BIN" ] && [ -f "$MODELS/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  printf 'What is the capital of France?\nName a primary colour.\n' > "$tmp/q.txt"
  "$BIN" extract persona -m "$MODELS/SmolLM2-135M-Instruct.Q4_1.gguf" -t 2 --parallel 4 \
    --questions "$tmp/q.txt" -o "$tmp/smol-compliant.safetensors" > /dev/null
  "$BIN" export-cvec -d "$tmp/smol-compliant.safetensors" --coefficient 4 --layers 10-11 \
    -o "$tmp/smol-cvec.gguf" > /dev/null
  "$BIN" export-cvec -d "$tmp/smol-compliant.safetensors" --coefficient -1 --layers 1 \
    -o "$tmp/smol-cvec1.gguf" > /dev/null
  # The paper preset as the binary writes it, both sizes, for a 30-layer model.
  for size in demo full; do
    "$BIN" reproduce -m "$MODELS/SmolLM2-135M-Instruct.Q4_1.gguf" --size $size --print-spec \
      > "$OUT/spec/preset-$size.toml"
  done
else
  echo "seed.sh: $BIN or the SmolLM2 model missing; using crafted direction files only" >&2
fi

python3 - "$SHARED" "$MODELS" "$tmp" "$OUT" <<'PY'
import json, os, struct, sys
shared, models, tmp, out = sys.argv[1:5]

def put(target, name, data):
    with open(os.path.join(out, target, name), "wb") as f:
        f.write(data)

# ---- prompts: byte 0 = format (0 json, 1 jsonl, 2 csv, 3 text), byte 1 = field choice.
for fn in sorted(os.listdir(os.path.join(shared, "refusal_direction"))):
    arr = json.load(open(os.path.join(shared, "refusal_direction", fn)))[:4]
    base = fn.rsplit(".", 1)[0]
    put("prompts", base + ".json", b"\x00\x00" + json.dumps(arr, indent=4).encode())
    put("prompts", base + ".jsonl", b"\x01\x00" + "".join(json.dumps(x) + "\n" for x in arr).encode())
    put("prompts", base + "-field.jsonl", b"\x01\x02" + "".join(json.dumps(x) + "\n" for x in arr).encode())
for fn in ("strongreject.csv", "strongreject_small.csv"):
    lines = open(os.path.join(shared, "strongreject", fn), "rb").read().split(b"\n")[:6]
    put("prompts", fn, b"\x02\x00" + b"\n".join(lines) + b"\n")
    put("prompts", "goal-" + fn, b"\x02\x01" + b"\n".join(lines) + b"\n")
for fn in ("harmful.txt", "harmless.txt", "neutral.txt"):
    put("prompts", fn, b"\x03\x00" + open("src/prompts/builtin/" + fn, "rb").read()[:2048])
put("prompts", "strings.json", b'\x00\x00["a", "b\\u00e9", "c"]')
put("prompts", "goal.jsonl", b'\x01\x01{"goal": "x", "category": "c", "source": "s"}\n\n{"goal": "y"}\n')

# ---- spec: the specs in the docs and every spec the tests write.
import glob, re
for fn in sorted(glob.glob("docs/results/*/spec.toml")):
    put("spec", fn.split("/")[2] + ".toml", open(fn, "rb").read())
for fn in sorted(glob.glob("tests/*.rs")):
    for i, m in enumerate(re.findall(r'r#"(.*?)"#', open(fn).read(), re.S)):
        if "[[experiment]]" in m:
            put("spec", "%s-%d.toml" % (os.path.basename(fn)[:-3], i), m.encode())

# ---- personas
put("personas", "builtin.toml", open("src/prompts/builtin/personas.toml", "rb").read())
put("personas", "small.toml", b"[x]\ndescription = 'd'\npositive = ['p']\nnegative = ['n', 'm']\n")

# ---- safetensors
def safetensors(tensors, meta):
    header, data = {}, b""
    for name, rows in tensors:
        start = len(data)
        for r in rows:
            data += struct.pack("<%df" % len(r), *r)
        header[name] = {"dtype": "F32", "shape": [len(rows), len(rows[0])], "data_offsets": [start, len(data)]}
    header["__metadata__"] = meta
    h = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data

put("safetensors", "one.safetensors", safetensors([("persona.x", [[1.0, -2.0, 0.5]] * 2)], {"arch": "llama", "kind": "persona"}))
put("safetensors", "two.safetensors", safetensors(
    [("refusal.pos-1", [[0.1 * i + j for j in range(4)] for i in range(3)]),
     ("refusal.pos-2", [[-0.1 * i - j for j in range(4)] for i in range(3)])],
    {"kind": "refusal", "n_layer": "3", "n_embd": "4", "positions": "post"}))
real = os.path.join(tmp, "smol-compliant.safetensors")
if os.path.exists(real):
    b = open(real, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    hdr = json.loads(b[8:8 + n])
    # The real header (every metadata key the tool writes), with the tensor cut to 2 x 8.
    t = hdr["persona.compliant"]
    t["shape"], t["data_offsets"] = [2, 8], [0, 64]
    h = json.dumps(hdr, sort_keys=True, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    put("safetensors", "smol-compliant-cut.safetensors", struct.pack("<Q", len(h)) + h + b[8 + n:8 + n + 64])

# ---- GGUF
def gstr(s):
    s = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(s)) + s

def gguf(kv, tensors, align=32):
    b = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for k, raw in kv:
        b += gstr(k) + raw
    off, data = 0, b""
    for name, vals in tensors:
        b += gstr(name) + struct.pack("<IQIQ", 1, len(vals), 0, off)
        d = struct.pack("<%df" % len(vals), *vals)
        d += b"\0" * (-len(d) % align)
        data += d
        off += len(d)
    b += b"\0" * (-len(b) % align)
    return b + data

S = lambda v: struct.pack("<I", 8) + gstr(v)
U32 = lambda v: struct.pack("<II", 4, v)
I32 = lambda v: struct.pack("<Ii", 5, v)
every_type = [
    ("general.architecture", S("llama")), ("general.name", S("tiny")),
    ("t.u8", struct.pack("<IB", 0, 7)), ("t.i8", struct.pack("<Ib", 1, -7)),
    ("t.u16", struct.pack("<IH", 2, 7)), ("t.i16", struct.pack("<Ih", 3, -7)),
    ("llama.block_count", U32(2)), ("t.i32", I32(-7)), ("t.f32", struct.pack("<If", 6, 0.5)),
    ("t.bool", struct.pack("<IB", 7, 1)), ("t.u64", struct.pack("<IQ", 10, 7)),
    ("t.i64", struct.pack("<Iq", 11, -7)), ("t.f64", struct.pack("<Id", 12, 0.25)),
    ("general.file_type", U32(3)), ("general.alignment", U32(32)),
    ("tokenizer.ggml.tokens", struct.pack("<IIQ", 9, 8, 3) + gstr("a") + gstr("b") + gstr("<s>")),
    ("tokenizer.ggml.scores", struct.pack("<IIQ", 9, 6, 2) + struct.pack("<2f", 0.0, -1.0)),
    ("tokenizer.chat_template", S("{% for m in messages %}{{ m.content }}{% endfor %}")),
]
put("gguf", "every-type.gguf", gguf(every_type, [("token_embd.weight", [0.5] * 8), ("output_norm.weight", [1.0] * 4)]))
cv = [("general.architecture", S("controlvector")), ("controlvector.model_hint", S("llama")), ("controlvector.layer_count", I32(2))]
for name, t in [("cvec-2.gguf", [("direction.1", [0.1, -0.2, 0.3, 0.4]), ("direction.2", [1.0, 2.0, 3.0, 4.0])]),
                ("cvec-hole.gguf", [("direction.1", [1.0] * 4), ("direction.4", [2.0] * 4)])]:
    put("cvec", name, gguf(cv, t))
    put("gguf", name, gguf(cv, t))
for fn in ("smol-cvec.gguf", "smol-cvec1.gguf"):
    p = os.path.join(tmp, fn)
    if os.path.exists(p):
        put("cvec", fn, open(p, "rb").read())
        put("gguf", fn, open(p, "rb").read())

# The real SmolLM2 header: scalar keys as they are, arrays cut to 4 elements, no tensors.
def read_model_header(path, limit=8 << 20):
    b = open(path, "rb").read(limit)
    pos = 24
    n_kv = struct.unpack_from("<Q", b, 16)[0]
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    def rstr(p):
        n = struct.unpack_from("<Q", b, p)[0]
        return b[p + 8:p + 8 + n], p + 8 + n
    def rval(t, p):
        if t == 8:
            s, q = rstr(p)
            return gstr(s), q
        if t == 9:
            et, n = struct.unpack_from("<IQ", b, p)
            p += 12
            items = []
            for i in range(n):
                v, p = rval(et, p)
                if i < 4:
                    items.append(v)
            return struct.pack("<IQ", et, len(items)) + b"".join(items), p
        return b[p:p + sizes[t]], p + sizes[t]
    kv = []
    for _ in range(n_kv):
        k, pos = rstr(pos)
        t = struct.unpack_from("<I", b, pos)[0]
        v, pos = rval(t, pos + 4)
        kv.append((k, struct.pack("<I", t) + v))
    return kv

model = os.path.join(models, "SmolLM2-135M-Instruct.Q4_1.gguf")
if os.path.exists(model):
    kv = read_model_header(model)
    kv = [(k, v) for k, v in kv if k != b"tokenizer.chat_template"] + [(b"tokenizer.chat_template", S("{{ messages }}"))]
    put("gguf", "smol-header.gguf", gguf(kv, [("token_embd.weight", [0.0] * 8)]))
PY
# ---- template: every chat template llama.cpp ships (the sdist's models/templates), cut to
# 8 KB, and the two test models' own.
for f in "$HOME"/.cache/persona-gate/llama-cpp-python-*/vendor/llama.cpp/models/templates/*.jinja; do
  [ -f "$f" ] && head -c 8192 "$f" > "$OUT/template/$(basename "$f")"
done
printf '%s' '{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}' > "$OUT/template/minimal.jinja"

# ---- group: byte 0 picks the group; the rest a group file, real ones from a tiny run on
# the plan fuzz/plan.json was taken from (fuzz/plan-spec.toml), then edited copies.
if [ -x "$BIN" ] && [ -f "$MODELS/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  "$BIN" reproduce -m "$MODELS/SmolLM2-135M-Instruct.Q4_1.gguf" -t 2 --spec fuzz/plan-spec.toml \
    -o "$tmp/run" > /dev/null
  cp "$tmp/run/plan.json" fuzz/plan.json
  i=0
  for g in "$tmp"/run/groups/g*.csv; do
    [ -f "$g" ] || continue
    { printf "\\x$(printf %02x $i)"; cat "$g"; } > "$OUT/group/g$i.csv"
    { printf "\\x$(printf %02x $i)"; head -c 200 "$g"; } > "$OUT/group/g$i-cut.csv"
    i=$((i + 1))
  done
fi
printf '\x00a,b\n"unterminated' > "$OUT/group/quote.csv"
[ -f fuzz/plan.json ] || { echo "seed.sh: the group target needs fuzz/plan.json (binary and SmolLM2 model)" >&2; exit 1; }

for t in prompts safetensors gguf cvec personas spec template group; do
  echo "fuzz/corpus/$t: $(ls "$OUT/$t" | wc -l) files, $(du -sk "$OUT/$t" | cut -f1) KB"
done
