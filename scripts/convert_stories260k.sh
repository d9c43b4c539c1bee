#!/usr/bin/env bash
# Regenerate the bundled model src/mtlora/assets/models/stories260k (mtlora:stories260k) from llama2.c's
# stories260K checkpoint and its SentencePiece tokenizer.
#   usage: scripts/convert_stories260k.sh [SOURCE_DIR]   (default: ../shared/models/stories260K)
# SOURCE_DIR must hold stories260K.bin, tok512.model and LICENSE.llama2c. The hand-written README.md of
# the bundled folder is kept; the generated files are replaced. The output is deterministic (same bytes).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SRC=${1:-$ROOT/../shared/models/stories260K}
PY=${PYTHON:-$ROOT/.venv/bin/python}
DEST=$ROOT/src/mtlora/assets/models/stories260k

for f in stories260K.bin tok512.model LICENSE.llama2c; do
  [ -f "$SRC/$f" ] || { echo "error: $SRC/$f not found" >&2; exit 2; }
done
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
HF_HUB_OFFLINE=1 "$PY" -m mtlora.cli convert llama2c "$SRC/stories260K.bin" "$SRC/tok512.model" "$TMP/out"
mkdir -p "$DEST"
cp "$TMP"/out/* "$DEST"/
cp "$SRC/LICENSE.llama2c" "$DEST/LICENSE.llama2c"
chmod 644 "$DEST"/*
ls -l "$DEST"
