"""Compare every CSV of two sets of runs (metrics.csv, tables/*.csv, report/csv/*.csv), cell by
cell, leaving out the cells that measure time or name a path of the machine.

    python examples/compare/compare_runs.py BEFORE AFTER     # exit 1 if a CSV differs
"""

import sys
from pathlib import Path

import pandas as pd

# time, or the path of the checkout / run directory (the dataset's sha256 is compared)
LEFT_OUT = {"seconds_per_sample", "load_seconds", "scoring_seconds", "started", "finished", "run", "command"}
LEFT_OUT |= {"workers", "dataset"}


def main(a: Path, b: Path) -> int:
    files = sorted(p.relative_to(a) for p in a.rglob("*.csv"))
    other = sorted(p.relative_to(b) for p in b.rglob("*.csv"))
    if files != other:
        print("different files:", sorted(map(str, set(files) ^ set(other))))
        return 1
    bad = reordered = 0
    for rel in files:
        x, y = pd.read_csv(a / rel), pd.read_csv(b / rel)
        if list(x.columns) != list(y.columns) or len(x) != len(y):
            print(f"SHAPE {rel}")
            bad += 1
            continue
        cols = [c for c in x.columns if c not in LEFT_OUT]
        xs = x[cols].astype(str).apply(lambda s: s.str.replace(str(a), "RUNS", regex=False))
        ys = y[cols].astype(str).apply(lambda s: s.str.replace(str(b), "RUNS", regex=False))
        if xs.equals(ys):
            continue
        if xs.sort_values(cols).reset_index(drop=True).equals(ys.sort_values(cols).reset_index(drop=True)):
            print(f"ORDER {rel}: the same rows in another order")
            reordered += 1
            continue
        diff = (xs != ys).any(axis=0)
        print(f"DIFF {rel}: {list(diff[diff].index)}")
        bad += 1
    print(f"{len(files)} CSV files compared: {bad} differ, {reordered} hold the same rows in another order")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
