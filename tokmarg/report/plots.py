"""The report's figures: tables in, PNG bytes out (matplotlib, no display needed)."""

from __future__ import annotations

import io
import textwrap

import matplotlib

matplotlib.use("Agg")  # before pyplot: render to files on a machine without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from tokmarg.metrics import HEADLINE  # noqa: E402

LABELS = {"f1_micro": "micro F1", "hamming_loss": "Hamming loss", "roc_auc_micro": "micro ROC AUC"}
DPI = 100


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _wrap(name: str, width: int = 22) -> str:
    return "\n".join(textwrap.wrap(name.replace("_", " "), width))


def _colors(models: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(models)}


def headline_plot(table: pd.DataFrame, names: dict[str, str]) -> bytes:
    """Grouped horizontal bars: one panel per headline metric, a bar per model, 95% CI whiskers."""
    strategies = list(pd.unique(table["strategy"]))
    models = list(pd.unique(table["model"]))
    colors = _colors(models)
    fig, axes = plt.subplots(
        1, len(HEADLINE), figsize=(4.2 * len(HEADLINE), 0.55 * len(strategies) * len(models) + 1.5)
    )
    height = 0.8 / len(models)
    y = np.arange(len(strategies))
    for ax, (metric, higher) in zip(np.atleast_1d(axes), HEADLINE):
        for j, model in enumerate(models):
            t = table[table["model"] == model].set_index("strategy").reindex(strategies)
            v = t[metric].to_numpy(dtype=float)
            lo, hi = t[f"{metric}_lo"].to_numpy(dtype=float), t[f"{metric}_hi"].to_numpy(dtype=float)
            err = np.vstack([np.nan_to_num(v - lo), np.nan_to_num(hi - v)])
            pos = y - 0.4 + height * (j + 0.5)
            ax.barh(pos, np.nan_to_num(v), height, xerr=err, color=colors[model], label=names[model], capsize=2)
        ax.set_yticks(y, [_wrap(s) for s in strategies] if ax is np.atleast_1d(axes)[0] else [""] * len(y))
        ax.invert_yaxis()
        ax.set_title(f"{LABELS[metric]} ({'higher' if higher else 'lower'} is better)", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    np.atleast_1d(axes)[0].legend(loc="lower left", bbox_to_anchor=(0, 1.08), ncol=min(4, len(models)), fontsize=8)
    return _png(fig)


def heatmap(table: pd.DataFrame, codes: list[str], support: pd.Series, title: str, names: dict[str, str]) -> bytes:
    """Rows model / strategy, columns codes (with their support), values annotated."""
    values = table[codes].to_numpy(dtype=float)
    rows = [f"{names[m]} / {s}" for m, s in zip(table["model"], table["strategy"])]
    fig, ax = plt.subplots(figsize=(0.62 * len(codes) + 4.5, 0.36 * len(rows) + 1.6))
    im = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(codes)), [f"{c}\nn={support[c]}" for c in codes], fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            text = "–" if np.isnan(v) else f"{v:.2f}"
            color = "grey" if np.isnan(v) else "white" if v < 0.6 else "black"  # NaN cells are blank (masked)
            ax.text(j, i, text, ha="center", va="center", fontsize=6.5, color=color)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03)
    return _png(fig)


def _panels(strategies: list[str]) -> tuple[plt.Figure, np.ndarray]:
    fig, axes = plt.subplots(1, len(strategies), figsize=(4.2 * len(strategies), 4.0), squeeze=False)
    return fig, axes[0]


def reliability_plot(table: pd.DataFrame, names: dict[str, str]) -> bytes:
    """One panel per score strategy: fraction of true labels against mean score per bin."""
    strategies = list(pd.unique(table["strategy"]))
    colors = _colors(list(pd.unique(table["model"])))
    fig, axes = _panels(strategies)
    for ax, strategy in zip(axes, strategies):
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
        for model, g in table[table["strategy"] == strategy].groupby("model", sort=False):
            g = g[g["n_pairs"] > 0]
            size = 12 + 60 * np.sqrt(g["n_pairs"] / g["n_pairs"].sum())
            ax.plot(g["mean_score"], g["fraction_true"], color=colors[model], linewidth=1.2, label=names[model])
            ax.scatter(g["mean_score"], g["fraction_true"], s=size, color=colors[model], zorder=3)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean score in bin", title=_wrap(strategy, 40))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of (sample, code) pairs that are true")
    axes[0].legend(fontsize=8, loc="upper left")
    return _png(fig)


def f1_curve_plot(curves: pd.DataFrame, thresholds: pd.DataFrame, names: dict[str, str]) -> bytes:
    """One panel per score strategy: micro F1 against the threshold, per model; a dot marks each
    model's F1-best threshold, a cross the configured one."""
    strategies = list(pd.unique(curves["strategy"]))
    colors = _colors(list(pd.unique(curves["model"])))
    fig, axes = _panels(strategies)
    for ax, strategy in zip(axes, strategies):
        for model, g in curves[curves["strategy"] == strategy].groupby("model", sort=False):
            f1 = g["f1_micro"].to_numpy()
            th = g["threshold"].to_numpy()
            best = int(np.argmax(f1))
            ax.plot(th, f1, color=colors[model], label=names[model])
            ax.scatter([th[best]], [f1[best]], color=colors[model], zorder=3)
            conf = thresholds[(thresholds["model"] == model) & (thresholds["strategy"] == strategy)]["threshold"]
            if len(conf):
                t = float(conf.iloc[0])
                k = int(np.argmin(np.abs(th - t)))  # the curve is a step function: its value at the grid point
                ax.scatter([th[k]], [f1[k]], marker="x", color=colors[model], s=50, zorder=3)
        ax.set(xlim=(0, 1), ylim=(0, None), xlabel="threshold", title=_wrap(strategy, 40))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("micro F1")
    axes[0].legend(fontsize=8)
    return _png(fig)
