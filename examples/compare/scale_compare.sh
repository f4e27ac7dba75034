#!/bin/sh
# The reduce and the report of one synthetic finished run, by an older tree and by this one, cell
# by cell (issue 20's documented diff):
#   examples/compare/scale_compare.sh OLD_TREE OUT [SAMPLES]
# OLD_TREE: a checkout of the code before (e.g. `git worktree add /tmp/old <commit>`); this tree's
# .venv runs both (PYTHONPATH picks the tree). The run is written one file per partition, the
# layout older trees read.
set -eu
OLD=$1 OUT=$2 N=${3:-2295}
PY=$(pwd)/.venv/bin/python
rm -rf "$OUT" && mkdir -p "$OUT"
$PY -m tokmarg.synthetic run "$OUT/before" --samples "$N" --models 3 --seed 5 --partitions-per-file 1
cp -r "$OUT/before" "$OUT/after"
(cd "$OLD" && PYTHONPATH="$OLD" $PY -m tokmarg eval --resume "$OUT/before" --no-ray --no-progress >/dev/null)
$PY -m tokmarg eval --resume "$OUT/after" --no-ray --no-progress >/dev/null
for side in before after; do
  mkdir -p "$OUT/csv/$side" && cp -r "$OUT/$side/metrics.csv" "$OUT/$side/tables" "$OUT/$side/report" "$OUT/csv/$side/"
done
$PY examples/compare/compare_runs.py "$OUT/csv/before" "$OUT/csv/after" || true
$PY - "$OUT/csv" <<'PY'
import sys
import pandas as pd
a, b = (pd.read_csv(f"{sys.argv[1]}/{s}/metrics.csv") for s in ("before", "after"))
cols = [c for c in a.columns if c != "seconds_per_sample"]
print("metrics.csv: columns added:", [c for c in b.columns if c not in a.columns])
print("metrics.csv: every other cell equal:", a[cols].astype(str).equals(b[cols].astype(str)))
PY
