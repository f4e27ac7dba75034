#!/usr/bin/env bash
# `tokmarg score`'s peak RSS at 1k and 10k rows (BENCHMARKS.md): a policy calibrated on a run of a
# tiny random Llama, applied to the shipped sample repeated with unique ids, labels dropped.
# Usage: examples/score/rss.sh WORK_DIR   (from the repository root, with the venv's python first on PATH)
set -euo pipefail
W=${1:?usage: rss.sh WORK_DIR}
mkdir -p "$W"
[ -f "$W/model/config.json" ] || python -m tokmarg.synthetic "$W/model" --shape tiny
python - "$W" <<'PY'
import json, sys
from pathlib import Path
w = Path(sys.argv[1])
rows = [json.loads(l) for l in Path("datasets/sample.jsonl").read_text().splitlines()]
for n in (1000, 10000):
    out = [{**rows[i % len(rows)], "id": f"r{i}"} for i in range(n)]
    (w / f"labeled-{n}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))
    (w / f"unlabeled-{n}.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "labels"}) + "\n" for r in out))
PY
printf 'strategies:\n  token_probability: {max_new_tokens: 4}\n' > "$W/params.yaml"  # short paths: rows, not tokens
[ -f "$W/run/manifest.json" ] || tokmarg eval --models "$W/model" --dataset "$W/labeled-1000.jsonl" \
  --params "$W/params.yaml" --out "$W/run" --no-ray --no-progress --no-report
tokmarg calibrate "$W/run" --out "$W/policy.yaml" > /dev/null
for n in 1000 10000; do
  rm -rf "$W/scores-$n"
  /usr/bin/time -f "score $n rows: %e s, peak RSS %M KB" \
    tokmarg score --policy "$W/policy.yaml" --dataset "$W/unlabeled-$n.jsonl" --out "$W/scores-$n" --no-ray --no-progress
done
