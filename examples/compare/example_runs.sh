#!/bin/bash
# usage: examples/compare/example_runs.sh TREE OUT
# The README's example runs (the demo, two models, paper semantics, the reference engine, a
# combined report), scored with the tokmarg of the checkout TREE, written under OUT. Run it for
# two commits and compare them with examples/compare/compare_runs.py.
set -e
TREE=$(cd "$1" && pwd); OUT=$2; PY=${PY:-$TREE/.venv/bin/python}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd); cd "$TREE"
TINY=${TINY:-/tmp/tokmarg-compare-tiny}  # a random Llama with Meta's Llama 3 vocabulary (seeded)
[ -d "$TINY" ] || "$PY" -m tokmarg.synthetic "$TINY" >/dev/null
run() { name=$1; shift; "$PY" -m tokmarg "$@" > "$OUT/$name.log" 2>&1; }
run demo eval --no-ray --out "$OUT/demo"
run two eval --no-ray --models smollm2-135m-instruct "$TINY" --limit 40 --out "$OUT/two"
run paper eval --no-ray --semantics paper --limit 30 --out "$OUT/paper"
run ref eval --no-ray --engine reference --models "$TINY" --limit 40 --out "$OUT/ref"
run tinyonly eval --no-ray --models "$TINY" --limit 40 --out "$OUT/tinyonly"
run smolonly eval --no-ray --limit 40 --out "$OUT/smolonly"
run combined report "$OUT/smolonly" "$OUT/tinyonly" --out "$OUT/combined"
echo "runs in $OUT"
