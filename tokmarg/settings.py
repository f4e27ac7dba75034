"""One settings object for ``tokmarg eval``, built at the edge: the command line's choices, the
files they name, or a resumed run's own record.

:class:`EvalSettings` holds every choice of a run, each with its default here and nowhere
else. Choices with a fixed set of values are ``Literal`` types (:data:`Engine`,
:data:`Semantics`, :data:`Dtype`) checked when the object is built. The fields that decide a
run's results are stored in ``run.json``; ``tokmarg eval --resume`` rebuilds the settings
from that record (:meth:`EvalSettings.resume`) and takes only how to run it (the launch, the
engine's batch sizes, progress) from the command line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from tokmarg.choices import Dtype, Engine, Format, Semantics, choose
from tokmarg.engine import DEFAULT_LOOKAHEAD
from tokmarg.errors import TokmargError

DEFAULT_PARTITION_SIZE = 32


def default_out() -> Path:
    """Where a run goes when ``--out`` is not given."""
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


class SettingsError(TokmargError, ValueError):
    """An option has a value it cannot take, or may not be given with another; one line."""


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs; ``engine`` changes nothing in the results, the rest only the speed."""

    engine: Engine = Engine.FAST
    batch_size: int = 0  # samples per fast batch; 0 = auto
    max_forward_tokens: int = 0  # tokens per forward call; 0 = auto
    lookahead: int = DEFAULT_LOOKAHEAD  # greedy tokens guessed ahead at most (0: none)

    def __post_init__(self) -> None:
        object.__setattr__(self, "engine", choose(Engine, self.engine, "--engine", SettingsError))

    def resolved(self, on_gpu: bool) -> tuple[int, int]:
        """(batch size, max forward tokens). Attention costs time linear in the batch, and every
        sequential model call reads all the weights once, so a larger batch costs less per sample
        (BENCHMARKS.md: the sweep); on a CPU fewer tokens per call keep activations small."""
        return (self.batch_size or 32), (self.max_forward_tokens or (4096 if on_gpu else 2048))


@dataclass(frozen=True, kw_only=True)
class LaunchSettings:
    """Where the workers run: Ray (a local instance or a cluster) or this process."""

    ray: bool = True
    address: str | None = None  # None: start a local Ray instance for the run
    replicas: int = 1
    gpus_per_actor: float | None = None  # None: 1 where the cluster has GPUs, else 0
    cpus_per_actor: float | None = None  # None: GPU actors 1, CPU actors a fair share
    max_restarts: int = 3
    dashboard_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if not self.ray and (self.address or self.replicas != 1 or self.gpus_per_actor):
            raise SettingsError("--no-ray scores in this process: drop --address, --replicas and --gpus-per-actor")


ENGINE_FIELDS = tuple(f.name for f in fields(EngineOptions))
LAUNCH_FIELDS = tuple(f.name for f in fields(LaunchSettings) if f.name != "ray")

# the fields of EvalSettings that decide a run's results: run.json keeps them, --resume reuses them
RESULT_FIELDS = (
    "models", "dataset", "params", "strategies", "limit", "semantics", "engine", "device", "dtype",
    "skip_invalid", "partition_size", "trust_remote_code", "allow_pickle", "format",
)  # fmt: skip
OPTIONAL_RESULT_FIELDS = ("format",)  # absent from runs made before it existed


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    """Everything ``tokmarg eval`` was asked to do."""

    params: Path
    dataset: Path
    inputs_from: dict[str, str] = field(default_factory=dict)  # params / dataset: command line, cwd or packaged
    models: tuple[str, ...] | None = None  # None: the params file's default (the embedded model)
    strategies: tuple[str, ...] | None = None  # None: every strategy the params file runs
    limit: int | None = None
    semantics: Semantics | None = None  # None: the params file's
    device: str = "auto"
    dtype: Dtype = Dtype.AUTO
    skip_invalid: bool = False
    format: Format | None = None  # the dataset file's (None: from its extension)
    partition_size: int = DEFAULT_PARTITION_SIZE
    trust_remote_code: bool = False
    allow_pickle: bool = False
    engine: EngineOptions = field(default_factory=EngineOptions)
    launch: LaunchSettings = field(default_factory=LaunchSettings)
    out: Path = field(default_factory=default_out)
    progress: bool = True
    command: str = ""

    def __post_init__(self) -> None:
        if self.semantics is not None:
            object.__setattr__(self, "semantics", choose(Semantics, self.semantics, "--semantics", SettingsError))
        object.__setattr__(self, "dtype", choose(Dtype, self.dtype, "--dtype", SettingsError))
        if self.format is not None:
            object.__setattr__(self, "format", choose(Format, self.format, "--format", SettingsError))
        if self.partition_size < 1:
            raise SettingsError(f"--partition-size {self.partition_size}: must be >= 1")

    def record(self) -> dict:
        """What ``run.json`` stores so that ``--resume`` can rebuild these settings."""
        out: dict = {"inputs_from": self.inputs_from}
        for name in RESULT_FIELDS:
            v = self.engine.engine if name == "engine" else getattr(self, name)
            out[name] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
        return out

    def resumed_from(self, run_dir: Path) -> EvalSettings:
        """These settings, continuing the run in ``run_dir`` with its own inputs (``run.json``)."""
        f = run_dir / "run.json"
        try:
            record = json.loads(f.read_text(encoding="utf-8"))["args"]
            if not isinstance(record, dict):
                raise TypeError("args")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SettingsError(f"{f}: cannot resume: not a tokmarg run ({e.__class__.__name__})") from None
        return replace(self._with_record(record, f), out=run_dir)

    def _with_record(self, record: dict, where: Path) -> EvalSettings:
        """These settings with the results-deciding fields of a run's ``record`` (``run.json``
        ``args``); ``where`` names the file in errors."""
        record = {**dict.fromkeys(OPTIONAL_RESULT_FIELDS), **record}
        missing = [k for k in RESULT_FIELDS if k not in record]
        if missing:
            raise SettingsError(
                f"{where}: cannot resume from the command line: the run was not started by `tokmarg eval` "
                f"(no {', '.join(missing[:3])})"
            )
        kw = {k: record[k] for k in RESULT_FIELDS if k != "engine"}
        for k in ("models", "strategies"):
            kw[k] = None if kw[k] is None else tuple(kw[k])
        kw.update(params=Path(kw["params"]), dataset=Path(kw["dataset"]), inputs_from=record.get("inputs_from") or {})
        return replace(self, engine=replace(self.engine, engine=record["engine"]), **kw)


def split_names(values: Sequence[str] | None) -> tuple[str, ...] | None:
    """``--models A B``, ``--models A,B`` and ``--models A --models B`` alike."""
    out = tuple(v for item in values or [] for v in item.replace(",", " ").split() if v)
    return out or None


def from_options(options: Mapping[str, Any], extra: Sequence[str] = (), command: str = "") -> EvalSettings:
    """The settings of a command line: ``options`` maps the command's parameter names to the
    values given (None: not given, so the default), ``extra`` are the words after ``--models``.
    With ``resume`` (a run directory), the run's own record gives the results-deciding fields
    and giving any of them again is an error.
    """
    from tokmarg.inputs import dataset_file, params_file

    o = {k: v for k, v in options.items() if v is not None}
    resume = o.pop("resume", None)
    if resume is not None:
        given = [f"--{k.replace('_', '-')}" for k in (*RESULT_FIELDS, "out") if k in o]
        if given or extra:
            drop = ", ".join(given) or " ".join(extra)
            raise SettingsError(f"--resume takes the run's inputs from {Path(resume) / 'run.json'}; drop {drop}")
    elif extra and not o.get("models"):
        raise SettingsError(f"unexpected argument(s): {' '.join(extra)}")
    (params, p_from), (dataset, d_from) = params_file(o.pop("params", None)), dataset_file(o.pop("dataset", None))
    engine = EngineOptions(**{k: o.pop(k) for k in ENGINE_FIELDS if k in o})
    launch = LaunchSettings(ray=not o.pop("no_ray", False), **{k: o.pop(k) for k in LAUNCH_FIELDS if k in o})
    models = split_names([*o.pop("models", []), *extra])
    settings = EvalSettings(
        params=params.resolve(),
        dataset=dataset.resolve(),
        inputs_from={"params": p_from, "dataset": d_from},
        models=models,
        strategies=split_names(o.pop("strategies", None)),
        engine=engine,
        launch=launch,
        command=command,
        **o,
    )
    return settings if resume is None else settings.resumed_from(Path(resume))
