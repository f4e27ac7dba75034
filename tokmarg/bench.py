"""`tokmarg bench`: reference vs fast on the same model, data and params.

Both engines score every sample with every strategy; each strategy is also timed alone on
the fast engine. Reported per strategy and for all together: samples/s per engine, the
speed ratio, tokens forwarded per sample, the largest score difference, and whether the
predicted codes agree (a sample where they do not is listed, never hidden: e.g. a
probability within 1e-5 of a pruning boundary can change a tree).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokmarg.config import Config
from tokmarg.data import Dataset
from tokmarg.engine.score import ScoreStats, score
from tokmarg.engine.tree import prepare
from tokmarg.models import load_model, model_view
from tokmarg.records import Manifest
from tokmarg.settings import EngineOptions, EvalSettings
from tokmarg.strategies import REGISTRY, SampleOutput
from tokmarg.strategies.uncertainty import finalize
from tokmarg.worker import WorkerSpec, build_queries

AGREE_TOL = 1e-4


@dataclass
class _Run:
    outs: dict[str, list[SampleOutput]]
    seconds: dict[str, float]
    stats: ScoreStats


def _diff(a: SampleOutput, b: SampleOutput) -> float:
    if a.scores is None or b.scores is None:  # one engine gave scores, the other none: never agree
        return 0.0 if a.scores is b.scores else 1e9
    keys = set(a.scores) | set(b.scores)
    return max((abs(a.scores.get(k, 0.0) - b.scores.get(k, 0.0)) for k in keys), default=0.0)


def engine_cost(stats: ScoreStats, seconds: float, n: int) -> dict:
    """The fast engine's own cost: time in the model (its layers and lm_head) and outside it
    (``host_seconds_per_sample``: all the rest, the strategies, matching, scheduling, and the
    reduction of the kept rows, also given alone as ``reduce_seconds``: on a GPU that part runs
    on the device, here on the same CPU cores as the rest)."""
    host = seconds - stats.model_seconds
    return {
        "model_seconds": stats.model_seconds,
        "reduce_seconds": stats.reduce_seconds,
        "host_seconds_per_sample": host / max(n, 1),
        "nodes_per_sample": stats.nodes / max(n, 1),
        "bytes_to_host_per_node": stats.bytes_to_host / max(stats.nodes, 1),
        "forward_calls": stats.forward_calls,
        "lookahead_tokens_guessed": stats.guessed,
        "lookahead_tokens_taken": stats.guesses_taken,
        "forward_profile": forward_profile(stats.calls),
    }


# the forward_profile's buckets of tokens per call: (lowest, highest)
CALL_SIZES = ((1, 1), (2, 8), (9, 32), (33, 128), (129, 512), (513, None))


def forward_profile(calls: Sequence[tuple[int, float]]) -> list[dict]:
    """The model calls by tokens per call: how many, their tokens, and milliseconds per call and
    per token. A time per call that hardly grows with its tokens is a memory-bound forward (the
    weights read once per call), where bigger batches and guesses ahead come nearly free; a time
    per token that stays flat is a compute-bound one, where they do not."""
    rows = []
    for low, high in CALL_SIZES:
        inside = [(n, s) for n, s in calls if low <= n and (high is None or n <= high)]
        if inside:
            tokens, seconds = sum(n for n, _ in inside), sum(s for _, s in inside)
            rows.append(
                {
                    "tokens": str(low) if high == low else f"{low}+" if high is None else f"{low}-{high}",
                    "calls": len(inside),
                    "tokens_total": tokens,
                    "ms_per_call": 1000 * seconds / len(inside),
                    "ms_per_token": 1000 * seconds / tokens,
                }
            )
    return rows


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Bench:
    """The first model of a config, loaded once, with its queries; runs engines on them."""

    def __init__(self, cfg: Config, ds: Dataset) -> None:
        self.cfg, self.mc = cfg, cfg.models[0]
        self.lm = load_model(self.mc.name, self.mc.device, self.mc.dtype)
        self.info, self.tokens = model_view(self.lm, cfg.taxonomy.codes)
        spec = WorkerSpec.from_config(self.mc, cfg)
        samples = ds.samples  # a benchmark's few samples, parsed once
        self.queries = build_queries(spec.prompt(self.lm.tokenizer), cfg.taxonomy.labels, samples, ds.has_safe)
        self.truth = [s.true_codes for s in samples]
        self.n = len(self.queries)
        if self.queries:
            self.lm.forward(self.queries[0].prompt_ids[:16])  # warm-up: first-call setup is not timed
            prepare(self.lm.model, self.lm.name)  # the fast engine's one-time switch and probe
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def run(self, opts: EngineOptions, names: Sequence[str]) -> _Run:
        cfg, mc = self.cfg, self.mc
        t0 = time.perf_counter()
        outs, stats = score(self.lm, self.info, self.tokens, self.queries, names, mc.params, cfg.semantics, opts)
        for s in names:
            if REGISTRY[s].kind.fitted:
                finalize(outs[s], self.truth, cfg.calibration, cfg.seed)
        secs = dict(stats.seconds)
        secs["total"] = time.perf_counter() - t0
        return _Run(outs, secs, stats)

    def fast_row(self, fast: _Run) -> dict:
        n = self.n
        return {
            "samples_per_s": n / fast.seconds["total"],
            "tokens_per_sample": sum(o.tokens_forwarded for outs in fast.outs.values() for o in outs) / n,
            "peak_rss_mb": peak_rss_mb(),
            **engine_cost(fast.stats, fast.seconds["total"], n),
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        }

    def compare(self, s: str, fast: _Run, ref: _Run, alone: _Run) -> dict:
        """Strategy ``s``: the reference against the fast engine (all strategies, and ``s`` alone)."""
        kind, thr, codes, n = REGISTRY[s].kind, self.mc.params[s].threshold, self.cfg.taxonomy.codes, self.n
        diffs = [_diff(a, b) for a, b in zip(fast.outs[s], ref.outs[s])]
        disagree = [
            q.sample_id
            for q, a, b, d in zip(self.queries, fast.outs[s], ref.outs[s], diffs)
            if d > AGREE_TOL or kind.sample_codes(a, thr, codes) != kind.sample_codes(b, thr, codes)
        ]
        ref_tok = sum(o.tokens_forwarded for o in ref.outs[s]) / n
        fast_tok = sum(o.tokens_forwarded for o in alone.outs[s]) / n
        return {
            "reference_samples_per_s": n / ref.seconds[s],
            "fast_samples_per_s": n / alone.seconds["total"],
            "speedup": ref.seconds[s] / alone.seconds["total"],
            "reference_tokens_per_sample": ref_tok,
            "fast_tokens_per_sample": fast_tok,
            "token_ratio": ref_tok / max(fast_tok, 1e-9),
            "max_abs_diff": max(d for d in diffs) if diffs else 0.0,
            "codes_agree": not disagree,
            "disagreeing_samples": disagree,
        }


def run_bench(cfg: Config, ds: Dataset, *, fast_only: bool = False, opts: EngineOptions | None = None) -> dict:
    """Benchmark the first model of ``cfg`` on ``ds``; returns the SPEC §6 bench object."""
    b = _Bench(cfg, ds)
    fast_opts = opts or EngineOptions("fast")
    strategies = list(cfg.strategies)
    fast = b.run(fast_opts, strategies)
    result: dict = {
        "engines": ["fast"] if fast_only else ["reference", "fast"],
        "model": b.mc.name,
        "semantics": cfg.semantics,
        "n_samples": b.n,
        "batch_size": fast_opts.resolved(b.lm.device.type == "cuda")[0],
        "device": str(b.lm.device),
        "dtype": str(b.lm.dtype).replace("torch.", ""),
        "fast": b.fast_row(fast),
    }
    if fast_only:
        return result
    ref = b.run(EngineOptions("reference"), strategies)
    per = {s: b.compare(s, fast, ref, b.run(fast_opts, [s])) for s in strategies}
    ref_total = sum(ref.seconds[s] for s in strategies)
    ref_tok = sum(o.tokens_forwarded for s in strategies for o in ref.outs[s]) / b.n
    f = result["fast"]
    result["per_strategy"] = per
    result["all"] = {
        "reference_samples_per_s": b.n / ref_total,
        "fast_samples_per_s": f["samples_per_s"],
        "speedup": ref_total / fast.seconds["total"],
        "reference_tokens_per_sample": ref_tok,
        "fast_tokens_per_sample": f["tokens_per_sample"],
        "token_ratio": ref_tok / max(f["tokens_per_sample"], 1e-9),
        **engine_cost(fast.stats, fast.seconds["total"], b.n),
        "max_abs_diff": max(p["max_abs_diff"] for p in per.values()),
        "codes_agree": all(p["codes_agree"] for p in per.values()),
        "disagreeing": [f"{s}:{i}" for s, p in per.items() for i in p["disagreeing_samples"]],
    }
    return result


def run_actor_bench(
    cfg: Config,
    ds: Dataset,
    actors: Sequence[int],
    *,
    partition_size: int = 8,
    opts: EngineOptions | None = None,
    address: str | None = None,
) -> dict:
    """`tokmarg eval` of the first model on Ray with 1, 2, ... CPU actors (replicas of one model).

    ``0`` is the same run in this process without Ray (the baseline). Each actor gets an equal
    share of the cores (threads = its CPUs), so the total never exceeds the machine. The rate
    is samples / the wall time of scoring (first partition sent to last one written); start-up
    (Ray, actor processes, model load) is reported apart.
    """
    import tempfile
    from dataclasses import replace
    from pathlib import Path

    from tokmarg.launch.cluster import RayLauncher
    from tokmarg.launch.local import LocalLauncher
    from tokmarg.runner import run_eval

    cfg = replace(cfg, models=cfg.models[:1])
    rows = []
    for n in actors:
        with tempfile.TemporaryDirectory(prefix="tokmarg-bench-") as tmp:
            launcher = (  # 0: the same run in this process, without Ray (the baseline)
                LocalLauncher() if n == 0 else RayLauncher(address, replicas=n, gpus_per_actor=0)
            )  # Ray: an equal share of the cores each
            settings = EvalSettings(
                params=Path(cfg.path),
                dataset=Path(ds.path),
                engine=opts or EngineOptions("fast"),
                partition_size=partition_size,
                out=Path(tmp) / "run",
                progress=False,
            )
            t0 = time.perf_counter()
            _, manifest = run_eval(cfg, ds, settings, launcher, log=lambda _m: None)
            total = time.perf_counter() - t0
        rows.append(_throughput_row(n, manifest, len(ds), total))
    return {"model": cfg.models[0].name, "n_samples": len(ds), "partition_size": partition_size, "rows": rows}


def _throughput_row(actors: int, manifest: Manifest, n: int, total: float) -> dict:
    """One row of ``tokmarg bench --actors``: the scoring rate, start-up apart."""
    import os

    launch, timing = manifest.launch, manifest.timing[manifest.models[0]]
    load = (timing.load_seconds or 0.0) if actors == 0 else 0.0  # the local launcher loads inside run()
    wall = launch["run_seconds"] - load
    return {
        "actors": actors,
        "cpus_per_actor": launch.get("cpus_per_actor", os.cpu_count()),
        "samples_per_s": n / wall,
        "scoring_seconds": wall,
        "start_seconds": launch["start_seconds"] + load,
        "end_to_end_seconds": total,
        "tokens_per_sample": timing.tokens_forwarded / n,
        "forward_calls": timing.forward_calls,
        "partitions_by_worker": timing.partitions_by_worker,
    }


def bench(settings: EvalSettings, *, fast_only: bool = False, actors: Sequence[int] | None = None) -> dict:
    """``tokmarg bench``: the engines on the settings' first model, or (``actors``) eval throughput."""
    from tokmarg.runner import load_inputs

    cfg, ds = load_inputs(settings)
    if actors:
        return run_actor_bench(
            cfg,
            ds,
            actors,
            partition_size=settings.partition_size,
            opts=settings.engine,
            address=settings.launch.address,
        )
    return run_bench(cfg, ds, fast_only=fast_only, opts=settings.engine)


def actor_counts(text: str) -> list[int]:
    """``--actors 0,1,2`` as counts; :class:`~tokmarg.settings.SettingsError` if it is not that."""
    from tokmarg.settings import SettingsError, split_names

    words = split_names([text]) or []
    if not words or not all(w.isdigit() for w in words):
        raise SettingsError(f"--actors {text!r}: expected actor counts such as 0,1,2 (0: without Ray)")
    return [int(w) for w in words]
