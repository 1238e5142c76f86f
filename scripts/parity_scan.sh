#!/usr/bin/env bash
# The reference loop alone at several glyph jitters, side by side on one GPU (docs/parity.md):
#   scripts/parity_scan.sh OUT "2 2.5 3" [parity.py args, e.g. --steps 2000 --batch-size 128]
# One tiny model (OUT/model: its VAE does not depend on the jitter) is shared; each jitter writes
# OUT/jJ/ and OUT/jJ.log. Picks the jitter at which the loop reaches ~0.85-0.9 (issue 24).
set -euo pipefail
out=$1 jitters=$2
shift 2
mkdir -p "$out"
python3 - "$out/model" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "scripts")
from parity_tasks import TASKS
if not Path(sys.argv[1], "model_index.json").exists():
    TASKS["glyphs"]().make_model(Path(sys.argv[1]))
PY
for j in $jitters; do
  python3 scripts/parity.py --out "$out/j$j" --model "$out/model" --task glyphs --jitter "$j" \
    --no-sdtrain "$@" > "$out/j$j.log" 2>&1 &
done
wait || true
for j in $jitters; do echo "== jitter $j"; grep -v 'it/s\]' "$out/j$j.log" | tail -n 8; done
