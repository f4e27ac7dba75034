"""Assemble the report of one or more run directories and write it atomically.

Layout of the report directory::

    report.md     Markdown, figures linked from plots/
    report.html   the same, self-contained (figures embedded)
    plots/*.png   the figures
    csv/*.csv     every table's numbers
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tokmarg.metrics import HEADLINE, METHODS
from tokmarg.report import plots
from tokmarg.report import tables as T
from tokmarg.report.inputs import ReportError, ReportInputs, load_inputs
from tokmarg.report.render import Block, Bullets, Figure, Heading, Table, Text, cell, to_html, to_markdown
from tokmarg.report.text import display_names

TITLE = "tokmarg report"
LABELS = plots.LABELS


@dataclass(frozen=True)
class ReportFiles:
    directory: Path
    markdown: Path
    html: Path
    plots: tuple[Path, ...]
    csvs: tuple[Path, ...]


REPORT_ENTRIES = {"report.md", "report.html", "csv", "plots"}


class _Doc:
    """Collects blocks, CSVs and figures while the sections are built."""

    def __init__(self, names: dict[str, str]) -> None:
        self.blocks: list[Block] = []
        self.csvs: dict[str, pd.DataFrame] = {}
        self.names = names

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)

    def table(self, frame: pd.DataFrame, csv_name: str | None = None, data: pd.DataFrame | None = None) -> None:
        """Show ``frame`` with short model names; write ``data`` (default ``frame``) with the full
        model names as ``csv/<csv_name>.csv``."""
        path = None
        if csv_name:
            path = f"csv/{csv_name}.csv"
            self.csvs[path] = frame if data is None else data
        self.add(Table(self.rename(frame), path))

    def figure(self, name: str, png: bytes, caption: str) -> None:
        self.add(Figure(f"plots/{name}.png", png, caption))

    def rename(self, df: pd.DataFrame) -> pd.DataFrame:
        """Model names in cells and column headers shortened for display."""
        out = df.copy()
        for col in ("model", "model_a", "model_b", "source", "target"):
            if col in out.columns:
                out[col] = out[col].map(lambda m: self.names.get(m, m))
        return out.rename(columns=lambda c: self._col(str(c)))

    def _col(self, c: str) -> str:
        for prefix in ("", "rank_"):
            if c.startswith(prefix) and c[len(prefix) :] in self.names:
                return prefix + self.names[c[len(prefix) :]]
        return c


def _ci(v: float, lo: float, hi: float) -> str:
    if np.isnan(v):
        return "–"
    return f"{v:.3f} [{cell(lo)}, {cell(hi)}]"


def _interval_note(metrics: pd.DataFrame) -> str:
    """How the brackets were made, from metrics.csv's ``<metric>_ci_method`` / ``_ci_replicates``."""
    said = []
    for metric, _ in HEADLINE:
        col = f"{metric}_ci_method"
        if col not in metrics.columns:  # runs reduced before the methods were recorded
            said.append(("bootstrap", 1000, LABELS[metric]))
            continue
        for method, reps in metrics[[col, f"{metric}_ci_replicates"]].drop_duplicates().itertuples(index=False):
            said.append((str(method), int(reps), LABELS[metric]))
    parts = []
    for method, reps in dict.fromkeys((m, r) for m, r, _ in said):
        what = ", ".join(dict.fromkeys(label for m, r, label in said if (m, r) == (method, reps)))
        how = METHODS.get(method, method) + (f", {reps} resamples" if reps else "")
        parts.append(f"{what}: {how}")
    return "Brackets are 95% intervals (" + "; ".join(parts) + ")."


def _intro(doc: _Doc, inputs: ReportInputs) -> None:
    first = inputs.runs[0].manifest
    n = inputs.n_samples
    n_safe = int((~inputs.y_true.any(axis=1)).sum())
    doc.add(
        Heading(1, TITLE),
        Text(
            f"{len(inputs.models)} model(s) x {len(inputs.strategies)} strategies on `{first.dataset or '?'}` "
            f"({n} samples, {n_safe} of them safe; sha256 `{first.dataset_sha256[:16]}…`), "
            f"from {len(inputs.runs)} run director{'y' if len(inputs.runs) == 1 else 'ies'}. "
            f"Semantics: {', '.join(sorted({r.manifest.semantics for r in inputs.runs}))}."
        ),
        Text(
            "Micro F1 and Hamming loss are over the taxonomy codes, with scores binarised at each strategy's "
            "threshold; micro ROC AUC ranks every (sample, code) score. Higher is better except for Hamming loss, "
            f"ECE and Brier. {_interval_note(inputs.metrics)}"
        ),
    )
    mixed = [
        k for k in ("semantics", "calibration", "engine") if len({getattr(r.manifest, k) for r in inputs.runs}) > 1
    ]
    if mixed:
        doc.add(Text(f"**Note:** the runs differ in {', '.join(mixed)}; see the run facts before comparing them."))


def _summary(doc: _Doc, inputs: ReportInputs, cross: dict[str, pd.DataFrame]) -> None:
    m = inputs.metrics
    items = []
    if len(inputs.models) >= 2:
        for metric, higher in HEADLINE:
            g = cross[f"generalization_{metric}"]
            g = g[g[inputs.models].notna().all(axis=1)]  # strategies every model ran
            if g.empty:
                continue
            sign = -1.0 if higher else 1.0  # best worst-case value; ties broken by the mean
            best = g.assign(_w=sign * g["worst"], _m=sign * g["mean"]).sort_values(["_w", "_m"], kind="stable").iloc[0]
            items.append(
                f"Best worst-case {LABELS[metric]} across models: **{best['strategy']}** "
                f"(worst {best['worst']:.3f}, mean {best['mean']:.3f})."
            )
        taus = cross["ranking_agreement_f1_micro"]
        if len(taus):
            items.append(
                "Agreement of the models' strategy rankings by micro F1 (Kendall tau): "
                + ", ".join(
                    f"{doc.names[a]} vs {doc.names[b]} {cell(t, 2)}"
                    for a, b, t in taus[["model_a", "model_b", "tau"]].itertuples(index=False)
                )
                + "."
            )
        if "threshold_transfer" in cross and len(cross["threshold_transfer"]):
            t = cross["threshold_transfer"]
            worst = t.loc[t["f1_lost"].idxmax()]
            items.append(
                f"Largest F1 lost by moving a threshold between models: {worst['f1_lost']:.3f} "
                f"({worst['strategy']}, threshold {worst['threshold']:.2f} chosen on {doc.names[worst['source']]}, "
                f"applied to {doc.names[worst['target']]})."
            )
    else:
        for metric, higher in HEADLINE:
            g = m.dropna(subset=[metric])
            if len(g):
                best = g.loc[g[metric].idxmax() if higher else g[metric].idxmin()]
                items.append(f"Best {LABELS[metric]}: **{best['strategy']}** ({best[metric]:.3f}).")
    pos, total = int(inputs.y_true.sum()), inputs.y_true.size
    if total:
        items.append(
            f"For scale: predicting every code for every sample gives micro F1 {2 * pos / (pos + total):.3f}, "
            f"predicting none gives Hamming loss {pos / total:.3f}, and uninformative scores give ROC AUC 0.5."
        )
    doc.add(Heading(2, "Summary"), Bullets(tuple(items)))


def _headline(doc: _Doc, inputs: ReportInputs) -> None:
    table = T.headline_table(inputs)
    doc.add(Heading(2, "1. Headline metrics"))
    doc.figure(
        "headline", plots.headline_plot(table, doc.names), "Headline metrics per strategy and model, with 95% CIs"
    )
    for i, (metric, higher) in enumerate(HEADLINE):
        wide = pd.DataFrame({"strategy": inputs.strategies})
        for model in inputs.models:
            t = table[table["model"] == model].set_index("strategy")
            wide[doc.names[model]] = [
                _ci(*(t.at[s, c] if s in t.index else np.nan for c in (metric, f"{metric}_lo", f"{metric}_hi")))
                for s in inputs.strategies
            ]
        doc.add(Text(f"**{LABELS[metric]}** ({'higher' if higher else 'lower'} is better)"))
        doc.table(wide, "headline" if i == 0 else None, table if i == 0 else None)


def _generalization(doc: _Doc, inputs: ReportInputs, cross: dict[str, pd.DataFrame]) -> None:
    doc.add(Heading(2, "2. Generalization across models"))
    if len(inputs.models) < 2:
        doc.add(Text("One model only: there is nothing to generalize across."))
        return
    doc.add(
        Text(
            "Per strategy: the metric on every model, its mean, standard deviation and worst value across models, "
            "and each model's rank of the strategy (1 = best). A strategy that generalizes has a good worst value "
            "and similar ranks; Kendall tau compares two models' whole rankings (1 = same order, -1 = reversed)."
        )
    )
    for metric, higher in HEADLINE:
        g = cross[f"generalization_{metric}"]
        ranks = [c for c in g.columns if str(c).startswith("rank_")]
        doc.add(Text(f"**{LABELS[metric]}** ({'higher' if higher else 'lower'} is better)"))
        doc.table(g.astype({c: "Int64" for c in ranks}), f"generalization_{metric}", g)
        doc.table(cross[f"ranking_agreement_{metric}"], f"ranking_agreement_{metric}")


def _thresholds(doc: _Doc, inputs: ReportInputs, cross: dict[str, pd.DataFrame], scored: list[str]) -> None:
    doc.add(Heading(2, "3. Thresholds: F1 versus threshold, and threshold transfer"))
    curves = T.f1_curves(inputs, scored)
    if curves.empty:
        doc.add(Text("No strategy with scores was run."))
        return
    doc.csvs["csv/f1_threshold_curves.csv"] = curves
    doc.figure(
        "f1_threshold",
        plots.f1_curve_plot(curves, inputs.metrics[["model", "strategy", "threshold"]], doc.names),
        "Micro F1 against the threshold on the scores (dot: the F1-best threshold; cross: the configured one)",
    )
    doc.add(Text("data: `csv/f1_threshold_curves.csv`"))
    if "threshold_transfer" in cross:
        doc.add(
            Text(
                "Threshold transfer: the F1-best threshold chosen on the source model (grid 0.00-1.00, step 0.01) "
                "applied to the target model; F1 lost = the target's own best F1 minus its F1 at that threshold."
            )
        )
        doc.table(cross["threshold_transfer"], "threshold_transfer")


def _per_code(doc: _Doc, inputs: ReportInputs) -> None:
    doc.add(Heading(2, "4. Per-code F1 and ROC AUC"))
    support = T.support(inputs)
    codes = list(inputs.codes)
    doc.add(Text("Support (samples labelled with each code): " + ", ".join(f"{c} {support[c]}" for c in codes) + "."))
    for metric, title in (("f1", "F1 per code"), ("roc_auc", "ROC AUC per code")):
        t = T.per_code_table(inputs, metric)
        if t.empty:
            continue
        doc.figure(f"per_code_{metric}", plots.heatmap(t, codes, support, title, doc.names), title + " (– = undefined)")
        doc.csvs[f"csv/per_code_{metric}.csv"] = t
        doc.add(Text(f"data: `csv/per_code_{metric}.csv`"))


def _calibration(doc: _Doc, inputs: ReportInputs, scored: list[str]) -> None:
    doc.add(Heading(2, "5. Calibration"))
    cal = T.calibration_table(inputs)
    if cal.empty:
        doc.add(Text("No strategy with scores was run."))
        return
    doc.add(
        Text(
            "Expected calibration error (15 equal-width bins) and Brier score over every (sample, code) pair; "
            "lower is better. The reliability diagrams show the same bins: on the diagonal, a score of p means "
            "the code is true a fraction p of the time (marker size: pairs in the bin)."
        )
    )
    wide = cal.pivot(index="strategy", columns="model", values=["ece", "brier"])
    shown = pd.DataFrame({"strategy": list(pd.unique(cal["strategy"]))})
    for what in ("ece", "brier"):
        for model in inputs.models:
            if (what, model) in wide.columns:
                shown[f"{what.upper() if what == 'ece' else 'Brier'} {doc.names[model]}"] = [
                    wide.at[s, (what, model)] for s in shown["strategy"]
                ]
    doc.table(shown, "calibration", cal)
    rel = T.reliability_table(inputs, scored)
    if not rel.empty:
        doc.csvs["csv/reliability.csv"] = rel
        doc.figure("reliability", plots.reliability_plot(rel, doc.names), "Reliability diagrams per score strategy")
        doc.add(Text("data: `csv/reliability.csv`"))
    if inputs.calibrated:
        _policies(doc, inputs)


def _policies(doc: _Doc, inputs: ReportInputs) -> None:
    th, rel = inputs.calibrated["thresholds"], inputs.calibrated["reliability"]
    doc.add(
        Heading(3, "5.1 Calibrated policies (`tokmarg calibrate`)"),
        Text(
            "Per code a calibration map and a threshold, fitted on every fold of the rows but one and measured on "
            "that held-out fold only: the numbers below saw neither the map's nor the threshold's fit. `flagged` is "
            "`unsafe` at its threshold or any code at its own; `codes (micro)` pools every (sample, code) pair, "
            "beside the raw scores at the run's threshold. Each policy file (last column) holds the maps."
        ),
    )
    summary = T.policy_summary(th, rel)
    doc.table(summary.assign(policy=[Path(p).name for p in summary["policy"]]), "policies", summary)
    codes = th[th["label"].isin(["unsafe", *inputs.codes])]
    doc.add(Text("Per code: the threshold and its held-out rates (fitted: enough positives and negatives to fit)."))
    doc.table(T.policy_codes(codes), "policy_thresholds", codes)
    both = rel.assign(model=rel["model"] + " · " + rel["when"])
    names = {m: f"{doc.names.get(m.rsplit(' · ', 1)[0], m)} {m.rsplit(' · ', 1)[1]}" for m in both["model"].unique()}
    doc.figure(
        "reliability_calibrated",
        plots.reliability_plot(both, names),
        "Held-out reliability per score strategy, raw scores (before) and calibrated (after)",
    )
    doc.csvs["csv/reliability_calibrated.csv"] = rel
    doc.add(Text("data: `csv/reliability_calibrated.csv`"))


def _binary(doc: _Doc, inputs: ReportInputs) -> None:
    doc.add(Heading(2, "6. Binary view: safe or unsafe"))
    b = T.binary_table(inputs)
    if b is None:
        doc.add(
            Text(
                "Every sample in this data is unsafe, so there is no safe/unsafe view."
                if not inputs.has_safe
                else "The runs have no binary-view metrics."
            )
        )
        return
    doc.add(
        Text(
            "Unsafe F1 and PR AUC from each strategy's `unsafe` score (or its verdict), false-positive rate on the "
            "safe samples."
        )
    )
    doc.table(b, "binary")


def _uncertainty(doc: _Doc, inputs: ReportInputs) -> None:
    doc.add(Heading(2, "7. Uncertainty strategies: how their threshold was fitted"))
    notes = sorted({r.manifest.calibration_note for r in inputs.runs} - {""})
    doc.add(
        Text(
            "The uncertainty strategies predict the top-1 code when a sample's uncertainty exceeds t_opti, else the "
            "top-2 codes. t_opti is fitted on labelled data: "
            + "; ".join(notes)
            + ". With the transductive mode (the paper's) their F1 is optimistic: the threshold saw the labels it is "
            "scored against."
        )
    )
    u = T.uncertainty_table(inputs)
    if not u.empty:
        doc.table(u, "uncertainty_thresholds")


def _facts(doc: _Doc, inputs: ReportInputs) -> None:
    doc.add(Heading(2, "8. Run facts"))
    runs = T.run_facts(inputs)
    doc.table(runs.T.reset_index().set_axis(["", *[f"run {i + 1}" for i in range(len(runs))]], axis=1), "runs", runs)
    doc.add(Text("Cost per model (the fast engine scores all strategies together; seconds are inside the workers):"))
    doc.table(T.model_facts(inputs), "models")
    params = T.params_table(inputs)
    if not params.empty:
        by_model = params.drop(columns="model").groupby(params["model"], sort=False)
        frames = [g.reset_index(drop=True) for _, g in by_model]
        same = all(f.equals(frames[0]) for f in frames)
        doc.add(Text("Parameters" + (" (the same for every model):" if same else " per model:")))
        doc.table(frames[0] if same else params, "params", params)


def build(inputs: ReportInputs) -> tuple[list[Block], dict[str, pd.DataFrame]]:
    """The report's blocks and its CSVs (relative path -> frame)."""
    doc = _Doc(display_names(inputs.models))
    cross = T.cross_tables(inputs)
    scored = T.score_strategies(inputs)
    _intro(doc, inputs)
    _summary(doc, inputs, cross)
    _headline(doc, inputs)
    _generalization(doc, inputs, cross)
    _thresholds(doc, inputs, cross, scored)
    _per_code(doc, inputs)
    _calibration(doc, inputs, scored)
    _binary(doc, inputs)
    _uncertainty(doc, inputs)
    _facts(doc, inputs)
    return doc.blocks, doc.csvs


def _check_out(out: Path) -> None:
    """``out`` is replaced as a whole: only where it is absent or an earlier report."""
    if out.exists() and (not out.is_dir() or not {p.name for p in out.iterdir()} <= REPORT_ENTRIES):
        raise ReportError(
            f"--out {out}: exists and is not a report directory (it would be replaced); choose a new directory"
        )


def write_report(run_dirs: list[Path], out: Path) -> ReportFiles:
    """Build the report of ``run_dirs`` into ``out`` (replaced as a whole, never half-written)."""
    _check_out(out)
    inputs = load_inputs(run_dirs)
    try:
        blocks, csvs = build(inputs)
    except (ValueError, KeyError, TypeError) as e:  # data the checks of load_inputs let through
        names = ", ".join(str(p) for p in run_dirs)
        raise ReportError(f"cannot build the report of {names}: {type(e).__name__}: {e}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the report is for reading
    old = None
    try:
        figures = [b for b in blocks if isinstance(b, Figure)]
        for f in figures:
            (tmp / f.file).parent.mkdir(exist_ok=True)
            (tmp / f.file).write_bytes(f.png)
        for rel, frame in csvs.items():
            (tmp / rel).parent.mkdir(exist_ok=True)
            frame.to_csv(tmp / rel, index=False)
        (tmp / "report.md").write_text(to_markdown(blocks), encoding="utf-8")
        (tmp / "report.html").write_text(to_html(blocks, TITLE), encoding="utf-8")
        if out.exists():
            old = out.parent / f".{out.name}-old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)  # put the previous report back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return ReportFiles(
        out,
        out / "report.md",
        out / "report.html",
        tuple(out / f.file for f in figures),
        tuple(out / rel for rel in csvs),
    )
