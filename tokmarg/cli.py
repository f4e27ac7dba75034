"""The `tokmarg` command line: parse, build the config, call the library, print."""

from __future__ import annotations

import shlex
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from tokmarg.engine import DEFAULT_ENGINE, DEFAULT_LOOKAHEAD

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Calibrated per-category confidence for generative LLM safety classifiers.",
)

DATASET_HELP = "JSONL dataset [default: ./datasets/sample.jsonl, else the packaged sample]"
PARAMS_HELP = "params.yaml [default: ./params.yaml, else the packaged defaults]"
COST_COLS = ("tokens_forwarded_per_sample", "seconds_per_sample")
HEADLINE_COLS = (
    "f1_micro",
    "hamming_loss",
    "roc_auc_micro",
    "f1_macro",
    "pr_auc_micro",
    "ece",
    "tokens_forwarded_per_sample",
    "seconds_per_sample",
)


def _fail(msg: str) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(2)


def _user_errors() -> tuple[type[BaseException], ...]:
    from tokmarg.config import ConfigError
    from tokmarg.data import DataError
    from tokmarg.engine import EngineError
    from tokmarg.models import ModelError
    from tokmarg.prompts import PromptError
    from tokmarg.report.inputs import ReportError
    from tokmarg.rundir import RunError
    from tokmarg.strategies import UnknownStrategy

    return ConfigError, DataError, EngineError, ModelError, PromptError, ReportError, RunError, UnknownStrategy


OOM_HINT = "out of memory: lower --batch-size or --max-forward-tokens (or use a smaller dtype)"


def _split(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [v for item in values for v in item.replace(",", " ").split() if v]


@app.command("strategies")
def strategies_cmd() -> None:
    """List the strategies and what each computes."""
    from tokmarg.strategies import REGISTRY

    for s in REGISTRY.values():
        typer.echo(f"{s.name:38s} {s.kind:12s} {s.doc.splitlines()[0] if s.doc else ''}")


@app.command("validate")
def validate_cmd(
    dataset: Annotated[Path | None, typer.Option(help=DATASET_HELP, show_default=False)] = None,
    params: Annotated[Path | None, typer.Option(help=PARAMS_HELP, show_default=False)] = None,
    models: Annotated[list[str] | None, typer.Option(help="model names (preset, HF id or directory)")] = None,
    strategies: Annotated[list[str] | None, typer.Option(help="subset of strategies")] = None,
    skip_invalid: Annotated[bool, typer.Option(help="skip invalid dataset lines")] = False,
) -> None:
    """Check a dataset and a params file without loading a model."""
    from tokmarg.config import build_config
    from tokmarg.data import load_dataset
    from tokmarg.inputs import dataset_file, params_file

    (params, params_from), (dataset, dataset_from) = params_file(params), dataset_file(dataset)
    try:
        cfg = build_config(params, _split(models), _split(strategies))
        ds = load_dataset(dataset, cfg.taxonomy, skip_invalid=skip_invalid)
    except _user_errors() as e:
        raise _fail(str(e)) from None
    safe = sum(1 for s in ds.samples if not s.labels)
    typer.echo(
        f"{params}: ok ({len(cfg.strategies)} strategies, semantics {cfg.semantics}, "
        f"models {', '.join(m.name for m in cfg.models)}; from the {params_from})"
    )
    typer.echo(
        f"{dataset}: ok ({len(ds.samples)} samples, {safe} safe, {ds.n_skipped} skipped, "
        f"taxonomy {cfg.taxonomy.name}, sha256 {ds.sha256[:12]}; from the {dataset_from})"
    )


RESUME_FIXED = (
    "models", "dataset", "params", "strategies", "limit", "semantics", "engine", "device", "dtype",
    "skip_invalid", "partition_size", "trust_remote_code", "allow_pickle", "out",
)  # fmt: skip


def _resume_args(run_dir: Path, ctx: typer.Context) -> dict:
    """The stored inputs of a run; options that would change its results may not be given again."""
    import json

    def on_command_line(name: str) -> bool:  # typer vendors click: compare the source by name
        return getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"

    given = [k for k in RESUME_FIXED if on_command_line(k)]
    if given or ctx.args:
        opts = ", ".join("--" + k.replace("_", "-") for k in given) or " ".join(ctx.args)
        raise _fail(f"--resume takes the run's inputs from {run_dir / 'run.json'}; drop {opts}")
    f = run_dir / "run.json"
    try:
        args = json.loads(f.read_text(encoding="utf-8"))["args"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _fail(f"{f}: cannot resume: not a tokmarg run ({e.__class__.__name__})") from None
    missing = [k for k in RESUME_FIXED if k != "out" and k not in (args or {})]
    if missing:
        raise _fail(
            f"{f}: cannot resume from the command line: the run was not started by `tokmarg eval` "
            f"(no {', '.join(missing[:3])})"
        )
    return args


@app.command("eval", context_settings={"allow_extra_args": True})
def eval_cmd(
    ctx: typer.Context,
    models: Annotated[
        list[str] | None, typer.Option(help="models: preset, HF id or local dir (default: embedded SmolLM2)")
    ] = None,
    dataset: Annotated[Path | None, typer.Option(help=DATASET_HELP, show_default=False)] = None,
    params: Annotated[Path | None, typer.Option(help=PARAMS_HELP, show_default=False)] = None,
    strategies: Annotated[list[str] | None, typer.Option(help="subset of strategies (default: all in params)")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="first N samples only")] = None,
    semantics: Annotated[str | None, typer.Option(help="exact | paper (overrides params)")] = None,
    engine: Annotated[
        str, typer.Option(help="fast (KV cache, tree attention) | reference (full forwards)")
    ] = DEFAULT_ENGINE,
    batch_size: Annotated[int, typer.Option(min=0, help="samples per fast-engine batch (0 = auto)")] = 0,
    max_forward_tokens: Annotated[int, typer.Option(min=0, help="tokens per forward call (0 = auto)")] = 0,
    out: Annotated[Path | None, typer.Option(help="run directory (default runs/<timestamp>)")] = None,
    resume: Annotated[Path | None, typer.Option(help="continue this run directory (its own inputs)")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16")] = "auto",
    skip_invalid: Annotated[bool, typer.Option(help="skip invalid dataset lines (counted in the manifest)")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="allow a model's own Python code (unsafe)")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="allow pickle (.bin) checkpoints (unsafe)")] = False,
    partition_size: Annotated[int, typer.Option(min=1, help="samples per partition (unit of work and resume)")] = 32,
    no_ray: Annotated[bool, typer.Option("--no-ray", help="score in this process, one model at a time")] = False,
    address: Annotated[
        str | None, typer.Option(help="join a Ray cluster: auto, HOST:6379 or ray://HOST:10001 (default: start one)")
    ] = None,
    replicas: Annotated[int, typer.Option(min=1, help="actors per model")] = 1,
    gpus_per_actor: Annotated[
        float | None, typer.Option(min=0, help="GPUs per actor (default 1 if the cluster has GPUs, else 0)")
    ] = None,
    cpus_per_actor: Annotated[
        float | None, typer.Option(min=0, help="CPUs per actor (default: GPU actors 1, CPU actors a fair share)")
    ] = None,
    max_restarts: Annotated[int, typer.Option(min=0, help="restarts of a crashed actor (its call is retried)")] = 3,
    dashboard_host: Annotated[
        str, typer.Option(help="interface of the local Ray dashboard (anything but 127.0.0.1 exposes it)")
    ] = "127.0.0.1",
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
    no_report: Annotated[bool, typer.Option("--no-report", help="skip writing RUN/report (tokmarg report)")] = False,
) -> None:
    """Score a dataset with every strategy on every model, print the strategy x model tables and
    write the report (RUN/report/report.html)."""
    from tokmarg.config import build_config
    from tokmarg.data import load_dataset
    from tokmarg.engine.score import EngineOptions
    from tokmarg.inputs import dataset_file, params_file
    from tokmarg.runner import RunOptions, run_eval

    if resume is not None:
        a = _resume_args(resume, ctx)
        out = resume
    else:
        if ctx.args and not models:
            raise _fail(f"unexpected argument(s): {' '.join(ctx.args)}")
        (params, params_from), (dataset, dataset_from) = params_file(params), dataset_file(dataset)
        a = {
            "models": _split([*(models or []), *ctx.args]),  # `--models A B C` as well as `--models A,B`
            "dataset": str(dataset.resolve()),
            "params": str(params.resolve()),
            "inputs_from": {"params": params_from, "dataset": dataset_from},
            "strategies": _split(strategies),
            "limit": limit,
            "semantics": semantics,
            "engine": engine,
            "device": device,
            "dtype": dtype,
            "skip_invalid": skip_invalid,
            "partition_size": partition_size,
            "trust_remote_code": trust_remote_code,
            "allow_pickle": allow_pickle,
        }
        out = out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        cfg = build_config(a["params"], a["models"], a["strategies"], a["semantics"], a["device"], a["dtype"])
        ds = load_dataset(Path(a["dataset"]), cfg.taxonomy, skip_invalid=a["skip_invalid"], limit=a["limit"])
        opts = RunOptions(
            EngineOptions(a["engine"], batch_size, max_forward_tokens),
            a["partition_size"],
            a["trust_remote_code"],
            a["allow_pickle"],
            progress,
            shlex.join(["tokmarg", *sys.argv[1:]]),
            a,
        )
        metrics, manifest = run_eval(
            cfg,
            ds,
            out,
            _launcher(no_ray, address, replicas, gpus_per_actor, cpus_per_actor, max_restarts, dashboard_host),
            opts,
        )
    except _user_errors() as e:
        raise _fail(str(e) + _kept(out)) from None
    except KeyboardInterrupt:
        raise _fail("interrupted" + (_kept(out) or "; no run directory written")) from None
    except OSError as e:  # e.g. the disk filled up while writing a partition
        raise _fail(f"{e.filename or out}: cannot write ({e.strerror or e})" + _kept(out)) from None
    except MemoryError:
        raise _fail(OOM_HINT + _kept(out)) from None
    except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError
        if "out of memory" not in str(e).lower():
            raise
        raise _fail(OOM_HINT + _kept(out)) from None
    _print_table(metrics, manifest)
    typer.echo(f"run directory: {out}")
    if not no_report:
        _report([out], out / "report", after_run=True)


def _report(run_dirs: list[Path], out: Path, after_run: bool = False) -> None:
    from tokmarg.report import write_report

    retry = f"; the run itself is complete: `tokmarg report {run_dirs[0]}` retries" if after_run else ""
    try:
        files = write_report(run_dirs, out)
    except _user_errors() as e:
        raise _fail(str(e) + retry) from None
    except OSError as e:
        raise _fail(f"{e.filename or out}: cannot write the report ({e.strerror or e})" + retry) from None
    typer.echo(f"report: {files.html} (and report.md, {len(files.plots)} plots, {len(files.csvs)} CSVs)")


@app.command("report")
def report_cmd(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(help="finished run directories (of one dataset)", metavar="RUN_DIR...", show_default=False),
    ],
    out: Annotated[
        Path | None, typer.Option(help="report directory (default RUN_DIR/report; required with several runs)")
    ] = None,
) -> None:
    """Write report.md, a self-contained report.html, plots and CSVs for one or more runs.
    Several run directories (e.g. one per model) combine when they scored the same samples."""
    if out is None:
        if len(run_dirs) > 1:
            raise _fail("several run directories: give --out DIR for the combined report")
        out = run_dirs[0] / "report"
    _report(run_dirs, out)


def _launcher(
    no_ray: bool,
    address: str | None,
    replicas: int,
    gpus: float | None,
    cpus: float | None,
    max_restarts: int,
    dashboard_host: str,
) -> object:
    if no_ray:
        if address or replicas != 1 or gpus:
            raise _fail("--no-ray scores in this process: drop --address, --replicas and --gpus-per-actor")
        from tokmarg.launch.local import LocalLauncher

        return LocalLauncher(threads=max(1, int(cpus)) if cpus else 0)
    from tokmarg.launch.cluster import RayLauncher

    return RayLauncher(
        address,
        replicas=replicas,
        gpus_per_actor=gpus,
        cpus_per_actor=cpus,
        max_restarts=max_restarts,
        dashboard_host=dashboard_host,
    )


def _kept(out: Path | None) -> str:
    """The hint after a failure that left finished partitions behind."""
    if out is not None and (out / "run.json").is_file():
        return f"; finished partitions are kept: `tokmarg eval --resume {out}` continues the run"
    return ""


@app.command("bench")
def bench_cmd(
    models: Annotated[list[str] | None, typer.Option(help="the model to benchmark (first one)")] = None,
    dataset: Annotated[Path | None, typer.Option(help=DATASET_HELP, show_default=False)] = None,
    params: Annotated[Path | None, typer.Option(help=PARAMS_HELP, show_default=False)] = None,
    strategies: Annotated[list[str] | None, typer.Option(help="subset of strategies")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="first N samples only")] = 20,
    semantics: Annotated[str | None, typer.Option(help="exact | paper (overrides params)")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16")] = "auto",
    batch_size: Annotated[int, typer.Option(min=0, help="samples per fast-engine batch (0 = auto)")] = 0,
    max_forward_tokens: Annotated[int, typer.Option(min=0, help="tokens per forward call (0 = auto)")] = 0,
    lookahead: Annotated[
        int, typer.Option(min=0, help="greedy tokens guessed ahead at most (0: none)")
    ] = DEFAULT_LOOKAHEAD,
    fast_only: Annotated[bool, typer.Option(help="time the fast engine only (peak memory rows)")] = False,
    actors: Annotated[
        str | None, typer.Option(help="instead: eval throughput with these CPU actor counts, e.g. 0,1,2 (0: no Ray)")
    ] = None,
    partition_size: Annotated[int, typer.Option(min=1, help="samples per partition (with --actors)")] = 8,
    address: Annotated[str | None, typer.Option(help="Ray cluster to join (with --actors; default: local)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Reference vs fast engine: speed, tokens forwarded, agreement (or, with --actors, Ray throughput)."""
    import json

    from tokmarg.bench import run_actor_bench, run_bench
    from tokmarg.config import build_config
    from tokmarg.data import load_dataset
    from tokmarg.engine.score import EngineOptions
    from tokmarg.inputs import dataset_file, params_file

    params, dataset = params_file(params)[0], dataset_file(dataset)[0]
    try:
        cfg = build_config(params, _split(models), _split(strategies), semantics, device, dtype)
        ds = load_dataset(dataset, cfg.taxonomy, limit=limit)
        eng = EngineOptions("fast", batch_size, max_forward_tokens, lookahead)
        if actors:
            try:
                counts = [int(a) for a in _split([actors]) or []]
            except ValueError:
                counts = []
            if not counts or min(counts) < 0:
                raise _fail(f"--actors {actors!r}: expected actor counts such as 0,1,2 (0: without Ray)")
            res = run_actor_bench(cfg, ds, counts, partition_size=partition_size, opts=eng, address=address)
        else:
            res = run_bench(cfg, ds, fast_only=fast_only, opts=eng)
    except _user_errors() as e:
        raise _fail(str(e)) from None
    except KeyboardInterrupt:
        raise _fail("interrupted") from None
    if actors and not as_json:
        typer.echo(f"model {res['model']}, {res['n_samples']} samples, partitions of {res['partition_size']}")
        typer.echo(
            f"{'actors':>6s} {'CPU each':>8s} {'samples/s':>9s} {'scoring s':>9s} {'start s':>8s} {'tok/sample':>10s}"
        )
        for r in res["rows"]:
            typer.echo(
                f"{r['actors']:6d} {r['cpus_per_actor']:8g} {r['samples_per_s']:9.3f} {r['scoring_seconds']:9.1f} "
                f"{r['start_seconds']:8.1f} {r['tokens_per_sample']:10.1f}"
            )
        return
    if as_json:
        typer.echo(json.dumps(res))
        return
    f = res["fast"]
    typer.echo(
        f"model {res['model']} on {res['device']} ({res['dtype']}), semantics {res['semantics']}, "
        f"{res['n_samples']} samples, fast batch {res['batch_size']}"
    )
    typer.echo(
        f"fast, all strategies: {f['samples_per_s']:.3f} samples/s, {f['tokens_per_sample']:.1f} tokens/sample, "
        f"peak RSS {f['peak_rss_mb']:.0f} MB" + (f", peak GPU {f['peak_gpu_mb']:.0f} MB" if f["peak_gpu_mb"] else "")
    )
    typer.echo(
        f"  per sample: {f['model_seconds'] / res['n_samples']:.4f} s in the model, "
        f"{f['host_seconds_per_sample']:.4f} s outside it (of which "
        f"{f['reduce_seconds'] / res['n_samples']:.4f} s reducing rows); {f['nodes_per_sample']:.1f} nodes, "
        f"{f['bytes_to_host_per_node']:.0f} bytes to the host per node"
    )
    if fast_only:
        return
    rows = [(name, p) for name, p in res["per_strategy"].items()] + [
        ("all seven" if len(res["per_strategy"]) == 7 else "all", res["all"])
    ]
    typer.echo(
        f"{'strategy':38s} {'ref/s':>8s} {'fast/s':>8s} {'speedup':>8s} {'ref tok':>9s} {'fast tok':>9s} "
        f"{'tok ratio':>9s} {'max diff':>9s} codes"
    )
    for name, p in rows:
        typer.echo(
            f"{name:38s} {p['reference_samples_per_s']:8.3f} {p['fast_samples_per_s']:8.3f} "
            f"{p['speedup']:8.1f} {p['reference_tokens_per_sample']:9.1f} {p['fast_tokens_per_sample']:9.1f} "
            f"{p['token_ratio']:9.1f} {p['max_abs_diff']:9.2e} {'agree' if p['codes_agree'] else 'DIFFER'}"
        )
    if not res["all"]["codes_agree"]:
        typer.echo(f"disagreeing (strategy:sample): {', '.join(res['all']['disagreeing'])}")


def _print_table(metrics: object, manifest: dict) -> None:
    import pandas as pd

    from tokmarg.reduce import HEADLINE

    df: pd.DataFrame = metrics  # type: ignore[assignment]
    fast = manifest["engine"] == "fast"
    typer.echo(
        f"\nsemantics={manifest['semantics']} engine={manifest['engine']} n_samples={manifest['n_samples']} "
        f"dataset={manifest['dataset']}"
    )
    typer.echo(f"note: {manifest['calibration_note']}")
    fmt = lambda v: f"{v:.4f}"  # noqa: E731
    if df["model"].nunique() == 1:
        # with the fast engine the strategies share forwards: cost is reported for all of them together
        cols = [c for c in HEADLINE_COLS if c in df.columns and not (fast and c in COST_COLS)]
        typer.echo(f"\nmodel: {df['model'].iloc[0]}")
        t = df.set_index("strategy")[cols].rename(
            columns={"tokens_forwarded_per_sample": "tokens/sample", "seconds_per_sample": "s/sample"}
        )
        typer.echo(t.to_string(float_format=fmt, na_rep="-"))
    else:  # strategies x models, one table per headline metric, with the cross-model summary
        for metric, higher in HEADLINE:
            wide = df.pivot(index="strategy", columns="model", values=metric)
            wide = wide.reindex(index=pd.unique(df["strategy"]), columns=pd.unique(df["model"]))
            wide.columns = [_short_name(c) for c in wide.columns]
            wide["mean"] = wide.mean(axis=1)
            wide["worst"] = wide.iloc[:, :-1].min(axis=1) if higher else wide.iloc[:, :-1].max(axis=1)
            typer.echo(f"\n{metric} ({'higher' if higher else 'lower'} is better)")
            typer.echo(wide.to_string(float_format=fmt, na_rep="-"))
    typer.echo("")
    for model in pd.unique(df["model"]):
        n = max(1, manifest["n_samples"])
        tok = manifest["tokens_forwarded"][model] / n
        t = manifest["timing"][model]
        where = ", ".join(f"{k}: {v}" for k, v in t.get("partitions_by_worker", {}).items())
        if fast:
            secs = t["seconds"].get("all", float("nan")) / n
            typer.echo(
                f"{_short_name(model)}: all strategies together {secs:.3f} s/sample, {tok:.1f} tokens forwarded/sample "
                f"(+ a {t['prefix_tokens']}-token shared prefix per partition); partitions by worker: {where}"
            )
        else:
            typer.echo(f"{_short_name(model)}: {tok:.1f} tokens forwarded/sample; partitions by worker: {where}")


def _short_name(model: str) -> str:
    """A model column header: the last path part of a local directory."""
    return Path(model).name if "/" in model and Path(model).exists() else model


def main() -> None:
    app()


if __name__ == "__main__":
    main()
