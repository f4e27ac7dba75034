"""Plain-text rendering for the terminal: the strategy x model tables after ``tokmarg eval`` and
the tables of ``tokmarg bench``. The CLI prints what these return."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from tokmarg.config import Config
from tokmarg.data import Dataset
from tokmarg.metrics import HEADLINE
from tokmarg.policy.file import Policy
from tokmarg.records import Manifest
from tokmarg.settings import EvalSettings

RESERVED = {"strategy", "model", "mean", "std", "worst", "run"}  # column names a model may not take
COST_COLS = ("tokens_forwarded_per_sample", "seconds_per_sample")
SINGLE_MODEL_COLS = (
    "f1_micro",
    "hamming_loss",
    "roc_auc_micro",
    "f1_macro",
    "pr_auc_micro",
    "ece",
    "tokens_forwarded_per_sample",
    "seconds_per_sample",
)


def display_names(models: Sequence[str]) -> dict[str, str]:
    """Short column names: the last part of a path, unless two models (or a table column) would share it."""
    short = {m: m.rstrip("/").rsplit("/", 1)[-1] or m for m in models}
    if len(set(short.values())) < len(short) or RESERVED & set(short.values()):
        return {m: m for m in models}
    return short


def _fmt(v: float) -> str:
    return f"{v:.4f}"


def inputs_summary(settings: EvalSettings, cfg: Config, ds: Dataset) -> str:
    """What ``tokmarg validate`` prints: both files checked, and what they hold."""
    safe = int((~ds.labels.any(axis=1)).sum())
    per_code = ", ".join(f"{c} {int(n)}" for c, n in zip(ds.codes, ds.labels.sum(axis=0)))
    where = settings.inputs_from
    return (
        f"{settings.params}: ok ({len(cfg.strategies)} strategies, semantics {cfg.semantics}, "
        f"models {', '.join(m.name for m in cfg.models)}; from the {where.get('params', '?')})\n"
        f"{settings.dataset}: ok ({len(ds)} samples, {safe} safe, {len(ds) - safe} unsafe, {ds.n_skipped} skipped, "
        f"taxonomy {cfg.taxonomy.name}, sha256 {ds.sha256[:12]}; from the {where.get('dataset', '?')})\n"
        f"samples per code: {per_code}"
    )


def eval_summary(metrics: pd.DataFrame, manifest: Manifest) -> str:
    """What ``tokmarg eval`` prints when a run is reduced: the metrics and the cost per model."""
    fast = manifest.engine == "fast"
    names = display_names(list(pd.unique(metrics["model"])))
    lines = [
        "",
        f"semantics={manifest.semantics} engine={manifest.engine} n_samples={manifest.n_samples} "
        f"dataset={manifest.dataset}",
        f"note: {manifest.calibration_note}",
    ]
    if metrics["model"].nunique() == 1:
        # with the fast engine the strategies share forwards: cost is reported for all of them together
        cols = [c for c in SINGLE_MODEL_COLS if c in metrics.columns and not (fast and c in COST_COLS)]
        t = metrics.set_index("strategy")[cols].rename(
            columns={"tokens_forwarded_per_sample": "tokens/sample", "seconds_per_sample": "s/sample"}
        )
        lines += ["", f"model: {metrics['model'].iloc[0]}", t.to_string(float_format=_fmt, na_rep="-")]
    else:  # strategies x models, one table per headline metric, with the cross-model summary
        for metric, higher in HEADLINE:
            wide = metrics.pivot(index="strategy", columns="model", values=metric)
            wide = wide.reindex(index=pd.unique(metrics["strategy"]), columns=pd.unique(metrics["model"]))
            wide.columns = [names[c] for c in wide.columns]
            wide["mean"] = wide.mean(axis=1)
            wide["worst"] = wide.iloc[:, :-1].min(axis=1) if higher else wide.iloc[:, :-1].max(axis=1)
            lines += ["", f"{metric} ({'higher' if higher else 'lower'} is better)"]
            lines.append(wide.to_string(float_format=_fmt, na_rep="-"))
    lines.append("")
    n = max(1, manifest.n_samples)
    for model in pd.unique(metrics["model"]):
        tok = manifest.tokens_forwarded[model] / n
        t = manifest.timing[model]
        where = ", ".join(f"{k}: {v}" for k, v in t.partitions_by_worker.items())
        if fast:
            lines.append(
                f"{names[model]}: all strategies together {t.seconds.get('all', float('nan')) / n:.3f} s/sample, "
                f"{tok:.1f} tokens forwarded/sample (+ a {t.prefix_tokens}-token shared prefix per partition); "
                f"partitions by worker: {where}"
            )
        else:
            lines.append(f"{names[model]}: {tok:.1f} tokens forwarded/sample; partitions by worker: {where}")
    return "\n".join(lines)


def actor_bench_summary(res: dict) -> str:
    """``tokmarg bench --actors``: eval throughput per actor count."""
    lines = [
        f"model {res['model']}, {res['n_samples']} samples, partitions of {res['partition_size']}",
        f"{'actors':>6s} {'CPU each':>8s} {'samples/s':>9s} {'scoring s':>9s} {'start s':>8s} {'tok/sample':>10s}",
    ]
    for r in res["rows"]:
        lines.append(
            f"{r['actors']:6d} {r['cpus_per_actor']:8g} {r['samples_per_s']:9.3f} {r['scoring_seconds']:9.1f} "
            f"{r['start_seconds']:8.1f} {r['tokens_per_sample']:10.1f}"
        )
    return "\n".join(lines)


def bench_summary(res: dict) -> str:
    """``tokmarg bench``: the fast engine's cost, then reference vs fast per strategy."""
    f, n = res["fast"], res["n_samples"]
    lines = [
        f"model {res['model']} on {res['device']} ({res['dtype']}), semantics {res['semantics']}, "
        f"{n} samples, fast batch {res['batch_size']}",
        f"fast, all strategies: {f['samples_per_s']:.3f} samples/s, {f['tokens_per_sample']:.1f} tokens/sample, "
        f"peak RSS {f['peak_rss_mb']:.0f} MB" + (f", peak GPU {f['peak_gpu_mb']:.0f} MB" if f["peak_gpu_mb"] else ""),
        f"  per sample: {f['model_seconds'] / n:.4f} s in the model, "
        f"{f['host_seconds_per_sample']:.4f} s outside it (of which "
        f"{f['reduce_seconds'] / n:.4f} s reducing rows); {f['nodes_per_sample']:.1f} nodes, "
        f"{f['bytes_to_host_per_node']:.0f} bytes to the host per node",
        "  model calls by tokens per call: "
        + ", ".join(
            f"{b['tokens']}: {b['calls']} x {b['ms_per_call']:.0f} ms ({b['ms_per_token']:.2f} ms/token)"
            for b in f["forward_profile"]
        ),
    ]
    if "per_strategy" not in res:
        return "\n".join(lines)
    rows = [*res["per_strategy"].items(), ("all seven" if len(res["per_strategy"]) == 7 else "all", res["all"])]
    lines.append(
        f"{'strategy':38s} {'ref/s':>8s} {'fast/s':>8s} {'speedup':>8s} {'ref tok':>9s} {'fast tok':>9s} "
        f"{'tok ratio':>9s} {'max diff':>9s} codes"
    )
    for name, p in rows:
        lines.append(
            f"{name:38s} {p['reference_samples_per_s']:8.3f} {p['fast_samples_per_s']:8.3f} "
            f"{p['speedup']:8.1f} {p['reference_tokens_per_sample']:9.1f} {p['fast_tokens_per_sample']:9.1f} "
            f"{p['token_ratio']:9.1f} {p['max_abs_diff']:9.2e} {'agree' if p['codes_agree'] else 'DIFFER'}"
        )
    if not res["all"]["codes_agree"]:
        lines.append(f"disagreeing (strategy:sample): {', '.join(res['all']['disagreeing'])}")
    return "\n".join(lines)


def calibrate_summary(policy: Policy, path: object) -> str:
    """After ``tokmarg calibrate``: per verdict its threshold and held-out rates, ECE before -> after."""
    p, d = policy, policy.dataset
    head = (
        f"policy: {path}\n  {p.model['id']} / {p.strategy['name']}: {p.calibration['method']}, "
        f"{p.calibration['objective']}; fitted on {d['fit_rows']} rows, measured on {d['held_out_rows']} held out"
    )
    rows = []
    for v in p.verdicts:
        h = v.held_out
        rows.append(
            {
                "verdict": v.label,
                "fitted": "yes" if v.fitted else "no",
                "threshold": v.threshold,
                "fit precision": v.fit.get("precision"),
                "support": h.get("support"),
                "precision": h.get("precision"),
                "recall": h.get("recall"),
                "f1": h.get("f1"),
                "fpr": h.get("fpr"),
                "ECE before": h.get("ece_before"),
                "ECE after": h.get("ece_after"),
            }
        )
    for name, h in (("flagged", p.flagged.get("held_out", {})), *p.summary.items()):
        rows.append({"verdict": name, **{k: h.get(k) for k in ("support", "precision", "recall", "f1", "fpr")}})
    table = pd.DataFrame(rows).to_string(index=False, na_rep="", float_format=_fmt)
    unfit = [v.label for v in p.verdicts if not v.fitted]
    note = f"\n  not fitted (identity map, the strategy's threshold): {', '.join(unfit)}" if unfit else ""
    return f"{head}\n{table}{note}"


def evaluation_summary(evaluation: pd.DataFrame) -> str:
    """After ``tokmarg score --evaluate``: per set of rows, each verdict's rates and ECE."""
    cols = ["label", "rows", "support", "flagged", "precision", "recall", "f1", "fpr", "ece_before", "ece_after"]
    out = []
    for name, g in evaluation.groupby("subset", sort=False):
        title = "every row" if name == "all" else "the policy's held-out rows (this is the dataset it was fitted on)"
        out.append(f"{title}:")
        out.append(g[[c for c in cols if c in g.columns]].to_string(index=False, na_rep="", float_format=_fmt))
    return "\n".join(out)
