#!/usr/bin/env bash
# Learning parity with one process per seed, side by side on one GPU (docs/parity.md):
#   scripts/parity_parallel.sh OUT "0 1 2" --task glyphs --steps 2000 --batch-size 128 [parity.py args]
# The task's model is made once (OUT/model) and shared; each seed writes OUT/seedN/ and its log.
set -euo pipefail
out=$1 seeds=$2
shift 2
mkdir -p "$out"
task=shapes
for ((i = 1; i <= $#; i++)); do [[ ${!i} == --task ]] && { j=$((i + 1)); task=${!j}; }; done
python3 - "$out/model" "$task" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "scripts")
from parity_tasks import TASKS
if not Path(sys.argv[1], "model_index.json").exists():
    TASKS[sys.argv[2]]().make_model(Path(sys.argv[1]))
PY
for s in $seeds; do
  python3 scripts/parity.py --out "$out/seed$s" --model "$out/model" --seeds "$s" "$@" \
    > "$out/seed$s.log" 2>&1 &
done
wait
for s in $seeds; do tail -n 12 "$out/seed$s.log"; done
