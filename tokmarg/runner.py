"""`tokmarg eval` on one process: score every sample with every strategy, then reduce.

Writes the run directory of SPEC §6 atomically: everything goes to a hidden sibling
directory that is renamed to ``out`` only when complete, so a failed run leaves nothing.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from tokmarg.config import Config, ModelConfig
from tokmarg.data import Dataset
from tokmarg.engine import DEFAULT_ENGINE, ENGINES
from tokmarg.engine.score import EngineOptions, score
from tokmarg.metrics import compute_metrics
from tokmarg.models import LoadedModel, load_model, model_view
from tokmarg.prompts import load_format, prompt_ids, render
from tokmarg.strategies import REGISTRY, Query, SampleOutput
from tokmarg.strategies.uncertainty import finalize

TRANSDUCTIVE_NOTE = "t_opti of the uncertainty strategies is fitted on the evaluated set's own labels (as the paper)"
SPLIT_NOTE = "t_opti of the uncertainty strategies is cross-fitted on 2 held-out halves (seeded)"


class RunError(RuntimeError):
    """The run cannot start or finish; one line."""


@dataclass
class ModelRun:
    rows: list[dict]
    seconds: dict[str, float]  # strategy -> wall seconds
    thresholds: dict[str, dict[str, float]]  # uncertainty strategy -> fitted t_opti
    load_seconds: float
    prefix_tokens: int  # shared prompt prefix prefilled once (fast engine)


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def build_queries(lm: LoadedModel, mc: ModelConfig, cfg: Config, ds: Dataset) -> list[Query]:
    """Each sample's prompt as this model sees it (its prompt format, chat template and taxonomy)."""
    fmt = load_format(mc.prompt)
    return [
        Query(
            sample.id,
            prompt_ids(lm.tokenizer, render(lm.tokenizer, fmt, sample, mc.taxonomy, mc.answer_prefix)),
            cfg.taxonomy.labels,
            ds.has_safe,
        )
        for sample in ds.samples
    ]


def score_model(
    mc: ModelConfig,
    cfg: Config,
    ds: Dataset,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    opts: EngineOptions | None = None,
) -> ModelRun:
    """Load one model and run every configured strategy on every sample."""
    opts = opts or EngineOptions()
    t0 = time.perf_counter()
    lm = load_model(mc.name, mc.device, mc.dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    info, tokens = model_view(lm, cfg.taxonomy.codes)
    queries = build_queries(lm, mc, cfg, ds)
    load_s = time.perf_counter() - t0
    bars = {
        s: tqdm(
            total=len(ds.samples),
            desc=f"{mc.name} {s}"[:60].ljust(60),
            position=i,
            leave=True,
            disable=not progress,
            file=sys.stderr,
            mininterval=0.5,
        )
        for i, s in enumerate(cfg.strategies)
    }
    try:
        outs, stats = score(
            lm,
            info,
            tokens,
            queries,
            cfg.strategies,
            mc.params,
            cfg.semantics,
            opts,
            on_done=lambda s, n: bars[s].update(n),
        )
    finally:
        for b in bars.values():
            b.close()
    truth = [s.labels for s in ds.samples]
    thresholds = {
        s: finalize(outs[s], truth, cfg.calibration, cfg.seed)
        for s in cfg.strategies
        if REGISTRY[s].kind == "uncertainty"
    }
    per_sample = [sum(outs[s][i].tokens_forwarded for s in cfg.strategies) for i in range(len(ds.samples))]
    rows = [
        {**_row(mc.name, s, sample, out), "sample_tokens_forwarded": per_sample[i]}
        for s in cfg.strategies
        for i, (sample, out) in enumerate(zip(ds.samples, outs[s]))
    ]
    return ModelRun(rows, stats.seconds, thresholds, load_s, stats.prefix_tokens)


def _row(model: str, strategy: str, sample: object, o: SampleOutput) -> dict:
    return {
        "model": model,
        "strategy": strategy,
        "sample_id": sample.id,  # type: ignore[attr-defined]
        "true_labels": list(sample.labels),  # type: ignore[attr-defined]
        "scores": None if o.scores is None else json.dumps(o.scores),
        "pred_labels": list(o.pred_labels),
        "unexplored_mass": o.unexplored_mass,
        "unexplored_by_label": None if o.unexplored_by_label is None else json.dumps(o.unexplored_by_label),
        "greedy_text": o.greedy_text,
        "uncertainty": o.uncertainty,
        "ranked": None if o.ranked is None else list(o.ranked),
        "gate_unsafe": o.gate_unsafe,
        "tokens_forwarded": int(o.tokens_forwarded),
        "extra": json.dumps(o.extra) if o.extra else None,
    }


def metrics_table(pred: pd.DataFrame, cfg: Config, ds: Dataset, n_boot: int = 1000) -> pd.DataFrame:
    """predictions -> one metrics row per model x strategy (SPEC §3)."""
    codes = list(cfg.taxonomy.codes)
    order = {s.id: i for i, s in enumerate(ds.samples)}
    y_true = np.array([[c in s.labels for c in codes] for s in ds.samples], dtype=bool)
    has_safe = ds.has_safe
    out = []
    params = {m.name: m.params for m in cfg.models}
    for (model, strategy), g in pred.groupby(["model", "strategy"], sort=False):
        g = g.iloc[np.argsort([order[i] for i in g["sample_id"]])]
        kind = REGISTRY[strategy].kind
        thr = params[model][strategy].threshold
        scores = [json.loads(s) if isinstance(s, str) else None for s in g["scores"]]
        has_scores = any(s is not None for s in scores)
        y_score = np.array([[(s or {}).get(c, 0.0) for c in codes] for s in scores]) if has_scores else None
        if kind == "scores":
            y_pred = y_score >= thr if y_score is not None else np.zeros_like(y_true)
        else:
            y_pred = np.array([[c in set(p) for c in codes] for p in g["pred_labels"]], dtype=bool)
        u_kw: dict = {}
        if has_safe:
            u_score = np.array([(s or {}).get("unsafe", 0.0) for s in scores]) if has_scores else None
            if kind == "scores" and u_score is not None:
                u_pred = u_score >= thr
            elif kind == "codes":  # the output said unsafe (even without a known code)
                flags = [json.loads(e).get("unsafe_in_output", 0.0) if isinstance(e, str) else 0.0 for e in g["extra"]]
                u_pred = np.array(flags, dtype=bool) | y_pred.any(axis=1)
            else:
                u_pred = y_pred.any(axis=1)
            u_kw = dict(unsafe_true=y_true.any(axis=1), unsafe_score=u_score, unsafe_pred=u_pred)
        m = compute_metrics(y_true, y_pred, y_score, codes=codes, n_boot=n_boot, seed=cfg.seed, **u_kw)
        fwd = g["tokens_forwarded"].to_numpy()
        out.append(
            {
                "model": model,
                "strategy": strategy,
                "threshold": thr,
                **m,
                "tokens_forwarded_per_sample": float(fwd.mean()) if len(fwd) else 0.0,
            }
        )
    return pd.DataFrame(out)


def versions() -> dict[str, str]:
    pkgs = ("tokmarg", "torch", "transformers", "accelerate", "pandas", "pyarrow", "scikit-learn", "gguf")
    out = {"python": platform.python_version()}
    for p in pkgs:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def _resolved(mc: ModelConfig) -> dict:
    return {
        "prompt": mc.prompt,
        "taxonomy": mc.taxonomy.name,
        "answer_prefix": mc.answer_prefix,
        "device": mc.device,
        "dtype": mc.dtype,
        "params": {s: vars(p) for s, p in mc.params.items()},
    }


def run_eval(
    cfg: Config,
    ds: Dataset,
    out: Path,
    *,
    engine: str = DEFAULT_ENGINE,
    command: str = "",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    batch_size: int = 0,
    max_forward_tokens: int = 0,
) -> tuple[pd.DataFrame, dict]:
    """Evaluate every model and write the run directory ``out``; returns (metrics, manifest)."""
    if engine not in ENGINES:
        raise RunError(f"--engine {engine!r} is not available; available: {', '.join(ENGINES)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunError(f"{out}: exists and is not an empty directory; choose another --out")
    started = datetime.now(UTC).isoformat(timespec="seconds")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "predictions").mkdir(parents=True)
    except OSError as e:
        raise RunError(f"{out}: cannot create the run directory ({e.strerror or e})") from None
    try:
        frames, timing = [], {}
        thresholds: dict[str, dict] = {}
        for mc in cfg.models:
            run = score_model(
                mc,
                cfg,
                ds,
                trust_remote_code=trust_remote_code,
                allow_pickle=allow_pickle,
                progress=progress,
                opts=EngineOptions(engine, batch_size, max_forward_tokens),
            )
            df = pd.DataFrame(run.rows)
            df.to_parquet(tmp / "predictions" / f"{slug(mc.name)}.parquet", index=False)
            frames.append(df)
            timing[mc.name] = {
                "load_seconds": run.load_seconds,
                "seconds": run.seconds,
                "prefix_tokens": run.prefix_tokens,
            }
            thresholds[mc.name] = run.thresholds
        pred = pd.concat(frames, ignore_index=True)
        metrics = metrics_table(pred, cfg, ds)
        # reference: each strategy's own time; fast: the strategies share forwards, so every row
        # shows the time of all of them together
        metrics["seconds_per_sample"] = [
            timing[m]["seconds"].get(s, timing[m]["seconds"].get("all", float("nan"))) / max(1, len(ds.samples))
            for m, s in zip(metrics.model, metrics.strategy)
        ]
        metrics.to_csv(tmp / "metrics.csv", index=False)
        manifest = {
            "command": command,
            "models": [m.name for m in cfg.models],
            "strategies": list(cfg.strategies),
            "semantics": cfg.semantics,
            "engine": engine,
            "calibration": cfg.calibration,
            "calibration_note": TRANSDUCTIVE_NOTE if cfg.calibration == "transductive" else SPLIT_NOTE,
            "t_opti": thresholds,
            "params_file": cfg.path,
            "params": cfg.raw,
            "resolved": {m.name: _resolved(m) for m in cfg.models},
            "taxonomy": cfg.taxonomy.name,
            "dataset": ds.path,
            "dataset_sha256": ds.sha256,
            "n_samples": len(ds.samples),
            "n_skipped": ds.n_skipped,
            "skipped": list(ds.skipped),
            "timing": timing,
            "tokens_forwarded": {m: int(g.sum()) for m, g in pred.groupby("model")["tokens_forwarded"]},
            "versions": versions(),
            "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count()},
            "started": started,
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return metrics, manifest
