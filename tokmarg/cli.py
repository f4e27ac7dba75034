"""The `tokmarg` command line: parse, build the config, call the library, print."""

from __future__ import annotations

import shlex
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from tokmarg.engine import DEFAULT_ENGINE

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Calibrated per-category confidence for generative LLM safety classifiers.",
)

DEFAULT_DATASET = "datasets/sample.jsonl"
DEFAULT_PARAMS = "params.yaml"
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
    from tokmarg.runner import RunError
    from tokmarg.strategies import UnknownStrategy

    return ConfigError, DataError, EngineError, ModelError, PromptError, RunError, UnknownStrategy


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
    dataset: Annotated[Path, typer.Option(help="JSONL dataset")] = Path(DEFAULT_DATASET),
    params: Annotated[Path, typer.Option(help="params.yaml")] = Path(DEFAULT_PARAMS),
    models: Annotated[list[str] | None, typer.Option(help="model names (preset, HF id or directory)")] = None,
    strategies: Annotated[list[str] | None, typer.Option(help="subset of strategies")] = None,
    skip_invalid: Annotated[bool, typer.Option(help="skip invalid dataset lines")] = False,
) -> None:
    """Check a dataset and a params file without loading a model."""
    from tokmarg.config import build_config
    from tokmarg.data import load_dataset

    try:
        cfg = build_config(params, _split(models), _split(strategies))
        ds = load_dataset(dataset, cfg.taxonomy, skip_invalid=skip_invalid)
    except _user_errors() as e:
        raise _fail(str(e)) from None
    safe = sum(1 for s in ds.samples if not s.labels)
    typer.echo(
        f"{params}: ok ({len(cfg.strategies)} strategies, semantics {cfg.semantics}, "
        f"models {', '.join(m.name for m in cfg.models)})"
    )
    typer.echo(
        f"{dataset}: ok ({len(ds.samples)} samples, {safe} safe, {ds.n_skipped} skipped, "
        f"taxonomy {cfg.taxonomy.name}, sha256 {ds.sha256[:12]})"
    )


@app.command("eval", context_settings={"allow_extra_args": True})
def eval_cmd(
    ctx: typer.Context,
    models: Annotated[
        list[str] | None, typer.Option(help="models: preset, HF id or local dir (default: embedded SmolLM2)")
    ] = None,
    dataset: Annotated[Path, typer.Option(help="JSONL dataset")] = Path(DEFAULT_DATASET),
    params: Annotated[Path, typer.Option(help="params.yaml")] = Path(DEFAULT_PARAMS),
    strategies: Annotated[list[str] | None, typer.Option(help="subset of strategies (default: all in params)")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="first N samples only")] = None,
    semantics: Annotated[str | None, typer.Option(help="exact | paper (overrides params)")] = None,
    engine: Annotated[
        str, typer.Option(help="fast (KV cache, tree attention) | reference (full forwards)")
    ] = DEFAULT_ENGINE,
    batch_size: Annotated[int, typer.Option(min=0, help="samples per fast-engine batch (0 = auto)")] = 0,
    max_forward_tokens: Annotated[int, typer.Option(min=0, help="tokens per forward call (0 = auto)")] = 0,
    out: Annotated[Path | None, typer.Option(help="run directory (default runs/<timestamp>)")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16")] = "auto",
    skip_invalid: Annotated[bool, typer.Option(help="skip invalid dataset lines (counted in the manifest)")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="allow a model's own Python code (unsafe)")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="allow pickle (.bin) checkpoints (unsafe)")] = False,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Score a dataset with every strategy and print the strategy x metric table."""
    from tokmarg.config import build_config
    from tokmarg.data import load_dataset
    from tokmarg.runner import run_eval

    out = out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if ctx.args and not models:
        raise _fail(f"unexpected argument(s): {' '.join(ctx.args)}")
    names = _split([*(models or []), *ctx.args])  # `--models A B C` as well as `--models A,B`
    try:
        cfg = build_config(params, names, _split(strategies), semantics, device, dtype)
        ds = load_dataset(dataset, cfg.taxonomy, skip_invalid=skip_invalid, limit=limit)
        metrics, manifest = run_eval(
            cfg,
            ds,
            out,
            engine=engine,
            command=shlex.join(["tokmarg", *sys.argv[1:]]),
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
            progress=progress,
            batch_size=batch_size,
            max_forward_tokens=max_forward_tokens,
        )
    except _user_errors() as e:
        raise _fail(str(e)) from None
    except KeyboardInterrupt:
        raise _fail("interrupted; no run directory written") from None
    except MemoryError:
        raise _fail(OOM_HINT) from None
    except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError
        if "out of memory" not in str(e).lower():
            raise
        raise _fail(OOM_HINT) from None
    _print_table(metrics, manifest)
    typer.echo(f"run directory: {out}")


@app.command("bench")
def bench_cmd(
    models: Annotated[list[str] | None, typer.Option(help="the model to benchmark (first one)")] = None,
    dataset: Annotated[Path, typer.Option(help="JSONL dataset")] = Path(DEFAULT_DATASET),
    params: Annotated[Path, typer.Option(help="params.yaml")] = Path(DEFAULT_PARAMS),
    strategies: Annotated[list[str] | None, typer.Option(help="subset of strategies")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="first N samples only")] = 20,
    semantics: Annotated[str | None, typer.Option(help="exact | paper (overrides params)")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16")] = "auto",
    batch_size: Annotated[int, typer.Option(min=0, help="samples per fast-engine batch (0 = auto)")] = 0,
    max_forward_tokens: Annotated[int, typer.Option(min=0, help="tokens per forward call (0 = auto)")] = 0,
    fast_only: Annotated[bool, typer.Option(help="time the fast engine only (peak memory rows)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Reference vs fast engine: speed, tokens forwarded, agreement."""
    import json

    from tokmarg.bench import run_bench
    from tokmarg.config import build_config
    from tokmarg.data import load_dataset
    from tokmarg.engine.score import EngineOptions

    try:
        cfg = build_config(params, _split(models), _split(strategies), semantics, device, dtype)
        ds = load_dataset(dataset, cfg.taxonomy, limit=limit)
        res = run_bench(cfg, ds, fast_only=fast_only, opts=EngineOptions("fast", batch_size, max_forward_tokens))
    except _user_errors() as e:
        raise _fail(str(e)) from None
    except KeyboardInterrupt:
        raise _fail("interrupted") from None
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

    df: pd.DataFrame = metrics  # type: ignore[assignment]
    fast = manifest["engine"] == "fast"
    typer.echo(
        f"\nsemantics={manifest['semantics']} engine={manifest['engine']} n_samples={manifest['n_samples']} "
        f"dataset={manifest['dataset']}"
    )
    typer.echo(f"note: {manifest['calibration_note']}")
    # with the fast engine the strategies share forwards: cost is reported for all of them together
    cols = [c for c in HEADLINE_COLS if c in df.columns and not (fast and c in COST_COLS)]
    for model, g in df.groupby("model", sort=False):
        typer.echo(f"\nmodel: {model}")
        t = g.set_index("strategy")[cols].rename(
            columns={"tokens_forwarded_per_sample": "tokens/sample", "seconds_per_sample": "s/sample"}
        )
        typer.echo(t.to_string(float_format=lambda v: f"{v:.4f}", na_rep="-"))
        if fast:
            n = max(1, manifest["n_samples"])
            tok = manifest["tokens_forwarded"][model] / n
            secs = manifest["timing"][model]["seconds"].get("all", float("nan")) / n
            prefix = manifest["timing"][model]["prefix_tokens"]
            typer.echo(
                f"all strategies together: {secs:.3f} s/sample, {tok:.1f} tokens forwarded/sample "
                f"(+ a {prefix}-token shared prefix, once)"
            )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
