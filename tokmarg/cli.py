"""The `tokmarg` command line: parse, build the settings, call one library function, print.

Every command's errors that a user can fix are :class:`~tokmarg.errors.TokmargError`s; they
become one ``error:`` line and exit code 2 (see :func:`_errors`).
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from tokmarg import choices as C
from tokmarg.choices import allowed
from tokmarg.errors import TokmargError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Calibrated per-category confidence for generative LLM safety classifiers.",
)

Opt = typer.Option
Models = Annotated[list[str] | None, Opt(help="models: preset, HF id or local dir (default: embedded SmolLM2)")]
Dataset = Annotated[
    Path | None, Opt(help="dataset: JSONL, Parquet or CSV (default: ./datasets/sample.jsonl, else the packaged sample)")
]
DataFormat = Annotated[
    str | None, Opt("--format", help=f"{allowed(C.Format, ' | ')} (default: from the file's extension)")
]
Params = Annotated[Path | None, Opt(help="params.yaml (default: ./params.yaml, else the packaged defaults)")]
Strategies = Annotated[list[str] | None, Opt(help="subset of strategies (default: all in params)")]
Limit = Annotated[int | None, Opt(min=1, help="first N samples only")]
Semantics = Annotated[str | None, Opt(help=f"{allowed(C.Semantics, ' | ')} (overrides params)")]
Engine = Annotated[
    str | None, Opt(help="fast (KV cache, tree attention; default) | reference (full forwards)")
]  # C.Engine's members
Device = Annotated[str | None, Opt(help="auto | cpu | cuda:N (default: auto)")]  # C.DeviceKind's
Dtype = Annotated[str | None, Opt(help=f"{allowed(C.Dtype, ' | ')} (default: auto)")]
BatchSize = Annotated[int | None, Opt(min=0, help="samples per fast-engine batch (default: 0 = auto)")]
MaxForward = Annotated[int | None, Opt(min=0, help="tokens per forward call (default: 0 = auto)")]
SkipInvalid = Annotated[bool | None, Opt("--skip-invalid", help="skip invalid dataset lines (counted)")]
TrustCode = Annotated[bool | None, Opt("--trust-remote-code", help="allow a model's own Python code (unsafe)")]
Pickle = Annotated[bool | None, Opt("--allow-pickle", help="allow pickle (.bin) checkpoints (unsafe)")]
PartitionSize = Annotated[int | None, Opt(min=1, help="samples per partition (unit of work and resume) (default: 32)")]
Address = Annotated[
    str | None, Opt(help="join a Ray cluster: auto, HOST:6379 or ray://HOST:10001 (default: start one)")
]
Gpus = Annotated[float | None, Opt(min=0, help="GPUs per actor (default 1 if the cluster has GPUs, else 0)")]
Cpus = Annotated[float | None, Opt(min=0, help="CPUs per actor (default: GPU actors 1, CPU actors a fair share)")]
Dashboard = Annotated[
    str | None, Opt(help="interface of the local Ray dashboard; anything but 127.0.0.1 exposes it (default: 127.0.0.1)")
]
OOM_HINT = "out of memory: lower --batch-size or --max-forward-tokens (or use a smaller dtype)"


@contextmanager
def _errors(out: Path | None = None, retry: str = "", command: str = "eval") -> Iterator[None]:
    """Turn what a user can fix into one ``error:`` line and exit code 2; name a run's kept partitions."""
    try:
        yield
    except TokmargError as e:
        raise _fail(str(e) + (_kept(out, command) or retry)) from None
    except KeyboardInterrupt:
        raise _fail("interrupted" + (_kept(out, command) or ("; no run directory written" if out else ""))) from None
    except OSError as e:  # e.g. the disk filled up while writing a partition
        raise _fail(f"{e.filename or out}: cannot write ({e.strerror or e})" + (_kept(out, command) or retry)) from None
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if isinstance(e, RuntimeError) and "out of memory" not in str(e).lower():
            raise
        raise _fail(OOM_HINT + _kept(out, command)) from None


def _kept(out: Path | None, command: str = "eval") -> str:
    """The hint after a failure that left finished partitions behind."""
    if out is not None and (out / "run.json").is_file():
        return f"; finished partitions are kept: `tokmarg {command} --resume {out}` continues the run"
    return ""


def _fail(msg: str) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(2)


@app.command("strategies")
def strategies_cmd() -> None:
    """List the strategies and what each computes."""
    from tokmarg.strategies import REGISTRY

    for s in REGISTRY.values():
        typer.echo(f"{s.name:38s} {s.kind.name:12s} {s.doc.splitlines()[0] if s.doc else ''}")


@app.command("validate")
def validate_cmd(
    dataset: Dataset = None,
    format: DataFormat = None,  # noqa: A002 - the option's name
    params: Params = None,
    models: Models = None,
    strategies: Strategies = None,
    skip_invalid: SkipInvalid = None,
) -> None:
    """Check a dataset and a params file without loading a model."""
    options = dict(locals())
    from tokmarg.report.text import inputs_summary
    from tokmarg.runner import load_inputs
    from tokmarg.settings import from_options

    with _errors():
        s = from_options(options)
        typer.echo(inputs_summary(s, *load_inputs(s)))


@app.command("prompts")
def prompts_cmd(
    models: Models = None,
    dataset: Dataset = None,
    format: DataFormat = None,  # noqa: A002 - the option's name
    params: Params = None,
    limit: Annotated[int, Opt(min=1, help="first N samples only")] = 3,
    ids: Annotated[bool, Opt("--ids", help="also print the token ids")] = False,
    trust_remote_code: TrustCode = None,
) -> None:
    """Print the exact text each model reads for each sample (loads tokenizers only)."""
    options = {k: v for k, v in locals().items() if k != "ids"}
    from tokmarg.chat import listing
    from tokmarg.models import load_tokenizer
    from tokmarg.runner import load_inputs
    from tokmarg.settings import from_options
    from tokmarg.worker import WorkerSpec

    with _errors():
        s = from_options(options)
        cfg, ds = load_inputs(s)
        tokenizers = [load_tokenizer(m.name, trust_remote_code=s.trust_remote_code) for m in cfg.models]
        prompts = [WorkerSpec.from_config(m, cfg).prompt(t) for m, t in zip(cfg.models, tokenizers)]
        lines = list(listing(prompts, ds.read(0, s.limit), ids))  # every prompt checked before anything prints
    typer.echo("\n".join(lines))


@app.command("eval", context_settings={"allow_extra_args": True})
def eval_cmd(
    ctx: typer.Context,
    models: Models = None,
    dataset: Dataset = None,
    params: Params = None,
    strategies: Strategies = None,
    limit: Limit = None,
    semantics: Semantics = None,
    engine: Engine = None,
    batch_size: BatchSize = None,
    max_forward_tokens: MaxForward = None,
    out: Annotated[Path | None, Opt(help="run directory (default runs/<timestamp>)")] = None,
    resume: Annotated[Path | None, Opt(help="continue this run directory (its own inputs)")] = None,
    device: Device = None,
    dtype: Dtype = None,
    skip_invalid: SkipInvalid = None,
    format: DataFormat = None,  # noqa: A002 - the option's name
    trust_remote_code: TrustCode = None,
    allow_pickle: Pickle = None,
    partition_size: PartitionSize = None,
    no_ray: Annotated[bool, Opt("--no-ray", help="score in this process, one model at a time")] = False,
    address: Address = None,
    replicas: Annotated[int | None, Opt(min=1, help="actors per model (default: 1)")] = None,
    gpus_per_actor: Gpus = None,
    cpus_per_actor: Cpus = None,
    max_restarts: Annotated[
        int | None, Opt(min=0, help="restarts of a crashed actor, its call retried (default: 3)")
    ] = None,
    dashboard_host: Dashboard = None,
    progress: Annotated[bool, Opt(help="show progress bars")] = True,
    no_report: Annotated[bool, Opt("--no-report", help="skip writing RUN/report (tokmarg report)")] = False,
) -> None:
    """Score a dataset with every strategy on every model, print the strategy x model tables and
    write the report (RUN/report/report.html)."""
    options = {k: v for k, v in locals().items() if k not in ("ctx", "no_report")}
    from tokmarg.report.text import eval_summary
    from tokmarg.runner import evaluate
    from tokmarg.settings import from_options

    with _errors():
        s = from_options(options, ctx.args, command=shlex.join(["tokmarg", *sys.argv[1:]]))
    with _errors(s.out):
        metrics, manifest = evaluate(s)
    typer.echo(eval_summary(metrics, manifest))
    typer.echo(f"run directory: {s.out}")
    if not no_report:
        _report([s.out], s.out / "report", retry=f"; the run itself is complete: `tokmarg report {s.out}` retries")


def _report(run_dirs: list[Path], out: Path, retry: str = "") -> None:
    from tokmarg.report import write_report

    with _errors(retry=retry):
        files = write_report(run_dirs, out)
    typer.echo(f"report: {files.html} (and report.md, {len(files.plots)} plots, {len(files.csvs)} CSVs)")


@app.command("report")
def report_cmd(
    run_dirs: Annotated[
        list[Path], typer.Argument(help="finished run directories (of one dataset)", metavar="RUN_DIR...")
    ],
    out: Annotated[
        Path | None, Opt(help="report directory (default RUN_DIR/report; required with several runs)")
    ] = None,
) -> None:
    """Write report.md, a self-contained report.html, plots and CSVs for one or more runs.
    Several run directories (e.g. one per model) combine when they scored the same samples."""
    if out is None and len(run_dirs) > 1:
        raise _fail("several run directories: give --out DIR for the combined report")
    _report(run_dirs, out or run_dirs[0] / "report")


@app.command("calibrate")
def calibrate_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a finished, labeled run directory", metavar="RUN_DIR")],
    models: Annotated[list[str] | None, Opt(help="models of the run (default: all)")] = None,
    strategies: Annotated[list[str] | None, Opt(help="score strategies of the run (default: all)")] = None,
    method: Annotated[str, Opt(help=f"{allowed(C.CalibrationMethod, ' | ')}")] = "isotonic",
    objective: Annotated[str, Opt(help="f1 | precision>=P | recall>=R | fpr<=F (per code, fitting folds)")] = "f1",
    out: Annotated[
        Path | None, Opt(help="policy file, for one model x strategy (default RUN_DIR/policies/MODEL__STRATEGY.yaml)")
    ] = None,
    folds: Annotated[int, Opt(min=2, help="seeded folds: one held out, the others fit")] = 5,
    seed: Annotated[int | None, Opt(help="seed of the folds (default: the run's seed)")] = None,
    min_positives: Annotated[
        int, Opt(min=1, help="fewer fitting positives (or negatives): identity map, the strategy's threshold")
    ] = 10,
) -> None:
    """Fit per-code calibration maps and thresholds on a labeled run; write a policy file per
    model x score strategy (for `tokmarg score`) and the held-out metrics the report shows."""
    from tokmarg.calibrate import CalibrateOptions, calibrate_run, policy_path
    from tokmarg.report.text import calibrate_summary
    from tokmarg.settings import split_names

    opts = CalibrateOptions(
        split_names(models) or (), split_names(strategies) or (), method, objective, out, folds, seed, min_positives
    )
    with _errors():
        fitted = calibrate_run(run_dir, opts)
    for f in fitted:
        typer.echo(calibrate_summary(f.policy, policy_path(run_dir, f, opts)))


@app.command("score", context_settings={"allow_extra_args": True})
def score_cmd(
    ctx: typer.Context,
    policy: Annotated[Path | None, Opt(help="a policy file (tokmarg calibrate)")] = None,
    dataset: Annotated[Path | None, Opt(help="rows to score: JSONL, Parquet or CSV (labels not needed)")] = None,
    evaluate: Annotated[bool, Opt("--evaluate", help="the rows are labeled: also write evaluation.csv")] = False,
    models: Annotated[list[str] | None, Opt(help="another copy of the policy's model (path or id)")] = None,
    params: Annotated[Path | None, Opt(help="params for what the policy leaves unsaid (devices, templates)")] = None,
    limit: Limit = None,
    engine: Engine = None,
    batch_size: BatchSize = None,
    max_forward_tokens: MaxForward = None,
    out: Annotated[Path | None, Opt(help="output directory (default runs/<timestamp>); again: resumes")] = None,
    resume: Annotated[Path | None, Opt(help="continue this score directory (its own inputs)")] = None,
    device: Device = None,
    dtype: Dtype = None,
    skip_invalid: SkipInvalid = None,
    format: DataFormat = None,  # noqa: A002 - the option's name
    trust_remote_code: TrustCode = None,
    allow_pickle: Pickle = None,
    partition_size: Annotated[
        int | None, Opt(min=1, help="samples per partition (default: the policy's run's, for the same batches)")
    ] = None,
    no_ray: Annotated[bool, Opt("--no-ray", help="score in this process")] = False,
    address: Address = None,
    replicas: Annotated[int | None, Opt(min=1, help="actors (default: 1)")] = None,
    gpus_per_actor: Gpus = None,
    cpus_per_actor: Cpus = None,
    max_restarts: Annotated[int | None, Opt(min=0, help="restarts of a crashed actor (default: 3)")] = None,
    dashboard_host: Dashboard = None,
    progress: Annotated[bool, Opt(help="show progress bars")] = True,
) -> None:
    """Apply a policy to a dataset on the same launcher as eval: scores.parquet, scores.jsonl (one
    OpenAI-moderation-shaped object per row) and, with --evaluate, evaluation.csv."""
    options = {k: v for k, v in locals().items() if k not in ("ctx", "policy", "evaluate", "params")}
    from tokmarg.scorerun import score as run_score
    from tokmarg.scorerun import score_settings

    with _errors():
        job, s = score_settings(
            options, policy, params, evaluate, ctx.args, command=shlex.join(["tokmarg", *sys.argv[1:]])
        )
    with _errors(s.out, command="score"):
        summary = run_score(job, s)
    typer.echo(f"scored {summary.rows} rows, {summary.flagged} flagged: {s.out / 'scores.parquet'}, scores.jsonl")
    if summary.evaluation is not None:
        from tokmarg.report.text import evaluation_summary

        typer.echo(evaluation_summary(summary.evaluation))
        typer.echo(f"evaluation: {s.out / 'evaluation.csv'}")


@app.command("bench")
def bench_cmd(
    models: Annotated[list[str] | None, Opt(help="the model to benchmark (first one)")] = None,
    dataset: Dataset = None,
    params: Params = None,
    strategies: Strategies = None,
    limit: Annotated[int, Opt(min=1, help="first N samples only")] = 20,
    semantics: Semantics = None,
    device: Device = None,
    dtype: Dtype = None,
    batch_size: BatchSize = None,
    max_forward_tokens: MaxForward = None,
    lookahead: Annotated[int | None, Opt(min=0, help="greedy tokens guessed ahead at most (0: none)")] = None,
    fast_only: Annotated[bool, Opt(help="time the fast engine only (peak memory rows)")] = False,
    actors: Annotated[str | None, Opt(help="instead: eval throughput with these CPU actor counts, e.g. 0,1,2")] = None,
    partition_size: Annotated[int, Opt(min=1, help="samples per partition (with --actors)")] = 8,
    address: Annotated[str | None, Opt(help="Ray cluster to join (with --actors; default: local)")] = None,
    as_json: Annotated[bool, Opt("--json", help="print one JSON object")] = False,
) -> None:
    """Reference vs fast engine: speed, tokens forwarded, agreement (or, with --actors, Ray throughput)."""
    options = {k: v for k, v in locals().items() if k not in ("fast_only", "actors", "as_json")}
    from tokmarg.bench import actor_counts, bench
    from tokmarg.report.text import actor_bench_summary, bench_summary
    from tokmarg.settings import from_options

    with _errors():
        counts = actor_counts(actors) if actors else None
        s = from_options(options)
        res = bench(s, fast_only=fast_only, actors=counts)
    if as_json:
        typer.echo(json.dumps(res))
    else:
        typer.echo(actor_bench_summary(res) if actors else bench_summary(res))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
