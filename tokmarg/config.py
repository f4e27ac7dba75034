"""One validated config: params.yaml + CLI choices -> :class:`Config`.

Precedence for a strategy parameter of one model (highest first):
``models.<m>.strategies.<s>.<key>`` > ``models.<m>.<key>`` > ``strategies.<s>.<key>`` >
the built-in default of :class:`~tokmarg.strategies.StrategyParams`.
Every error is one line naming the file and key and saying what is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from tokmarg.choices import Calibration, Dtype, E, Semantics, choose, device_kind
from tokmarg.errors import TokmargError
from tokmarg.models import DEFAULT_MODEL
from tokmarg.prompts import BUILTIN_FORMATS, PromptError, load_format
from tokmarg.sources import FIELDS, ColumnMap
from tokmarg.strategies import REGISTRY, StrategyParams
from tokmarg.taxonomy import BUILTIN, Taxonomy, TaxonomyError, differing, get_taxonomy, taxonomy_from_mapping

PARAM_KEYS = tuple(f.name for f in fields(StrategyParams))
TOP_KEYS = (
    "semantics",
    "calibration",
    "taxonomy",
    "taxonomies",
    "exclude_codes",
    "prompt",
    "strategies",
    "models",
    "seed",
    "dataset",
)
MODEL_KEYS = ("prompt", "taxonomy", "exclude_codes", "answer_prefix", "device", "dtype", "strategies", *PARAM_KEYS)


class ConfigError(TokmargError, ValueError):
    """Invalid params or CLI choice; the message is one line."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    prompt: str  # "guard", "instruct" or a template path
    taxonomy: Taxonomy  # the policy the prompt shows (less the excluded codes)
    answer_prefix: str  # text the model writes before safe/unsafe (e.g. "\n\n" for Llama Guard 3)
    device: str
    dtype: str
    params: dict[str, StrategyParams]  # strategy -> resolved params

    @property
    def exclude_codes(self) -> tuple[str, ...]:
        """Codes left out of the prompt's policy (the run's and its own)."""
        return self.taxonomy.excluded_codes


@dataclass(frozen=True)
class Config:
    path: str
    raw: dict
    semantics: Semantics
    calibration: Calibration
    taxonomy: Taxonomy  # the dataset's taxonomy, less the run's `exclude_codes` (its labels)
    strategies: tuple[str, ...]
    models: tuple[ModelConfig, ...]
    seed: int
    dataset: ColumnMap = field(default_factory=ColumnMap)  # params `dataset:`: the file's column names


def _choice(where: str, value: object, kind: type[E]) -> E:
    return choose(kind, value, where, ConfigError)


def _device(where: str, value: str) -> str:
    device_kind(value, where, ConfigError)
    return value


def _mapping(where: str, value: object, allowed: Sequence[str] | None = None) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    if allowed is not None:
        for key in value:
            if key not in allowed:
                raise ConfigError(f"{where}.{key}: unknown key; allowed: {', '.join(allowed)}")
    return value


def _columns(where: str, value: object, codes: Sequence[str]) -> ColumnMap:
    """Params ``dataset:``: {prompt, response, conversation, id: column; labels: column, or
    {code: 0/1 column}}."""
    spec = _mapping(where, value, FIELDS)
    columns = {}
    for key, col in spec.items():
        if key == "labels" and isinstance(col, dict):
            unknown = [c for c in col if c not in codes]
            if unknown:
                raise ConfigError(f"{where}.labels.{unknown[0]}: not a code of the run's taxonomy ({', '.join(codes)})")
            if not all(isinstance(v, str) and v for v in col.values()):
                raise ConfigError(f"{where}.labels: each code's value must be a column name")
        elif not isinstance(col, str) or not col:
            what = "a column name, or {code: column} of 0/1 columns" if key == "labels" else "a column name"
            raise ConfigError(f"{where}.{key}: {col!r} must be {what}")
        columns[key] = col
    labels = columns.pop("labels", None)
    return ColumnMap(columns, labels)


def _string(where: str, value: object, default: str) -> str:
    """A string setting; null means the default."""
    if value is None:
        return default
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {value!r} must be a string")
    return value


def _prompt(where: str, value: object, base_dir: Path) -> str:
    """guard, instruct, or a template file (relative to the cwd, else to the params file's folder)."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {value!r} must be guard, instruct or a template file path")
    if value in BUILTIN_FORMATS:
        return value
    path = Path(value)
    if not path.is_file() and not path.is_absolute() and (base_dir / path).is_file():
        path = base_dir / path
    if not path.is_file():
        raise ConfigError(f"{where}: {value!r} is not guard, instruct or an existing template file")
    try:
        load_format(str(path))
    except PromptError as e:
        raise ConfigError(f"{where}: {e}") from None
    return str(path)


def _param(where: str, key: str, value: object) -> float | int:
    if key == "max_new_tokens":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}.{key}: {value!r} must be an integer >= 1")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}.{key}: {value!r} must be a number")
    ok = {"top_p": 0 < value <= 1, "eps": 0 <= value < 1, "threshold": 0 <= value <= 1}[key]
    if not ok:
        rng = {"top_p": "0 < top_p <= 1", "eps": "0 <= eps < 1", "threshold": "0 <= threshold <= 1"}[key]
        raise ConfigError(f"{where}.{key}: {value!r} out of range ({rng})")
    return float(value)


def _params(where: str, value: object) -> dict[str, float | int]:
    return {k: _param(where, k, v) for k, v in _mapping(where, value, PARAM_KEYS).items()}


def load_params(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such params file")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    return _mapping(str(p), raw, TOP_KEYS)


def build_config(
    path: str | Path,
    models: Sequence[str] | None = None,
    strategies: Sequence[str] | None = None,
    semantics: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    raw: dict | None = None,
) -> Config:
    """Validate params.yaml and the CLI choices into one :class:`Config`; ``raw``: the params as
    already read (``tokmarg score`` adds a policy's to a file's), ``path`` then names them."""
    f = str(path)
    raw = load_params(path) if raw is None else _mapping(f, raw, TOP_KEYS)
    sem = _choice(
        "--semantics" if semantics else f"{f}: semantics", semantics or raw.get("semantics", "exact"), Semantics
    )
    cal = _choice(f"{f}: calibration", raw.get("calibration", "transductive"), Calibration)
    taxonomies = _Taxonomies(f, raw)
    taxonomy = taxonomies.get(f"{f}: taxonomy", raw.get("taxonomy", "llama_guard_3"))
    taxonomy = _without(f"{f}: exclude_codes", taxonomy, raw.get("exclude_codes"))
    base_dir = Path(path).resolve().parent
    defaults = _ModelDefaults(
        prompt=_prompt(f"{f}: prompt", raw.get("prompt", "instruct"), base_dir),
        device=_device("--device", _string("--device", device, "auto")),
        dtype=_choice("--dtype", dtype, Dtype),
        base_dir=base_dir,
    )
    base, chosen = _strategies(f, raw, strategies)
    model_raw = _mapping(f"{f}: models", raw.get("models"))
    names = list(models or [DEFAULT_MODEL])
    if len(set(names)) != len(names):
        raise ConfigError(f"--models: a model is named twice in {names}")
    built = {
        name: _model(f, name, model_raw.get(name), base, chosen, taxonomy, taxonomies, defaults)
        for name in [*model_raw, *(n for n in names if n not in model_raw)]  # every entry is validated
    }
    for name in names:  # an entry's taxonomy must mean the run's codes and hold them, where the model runs
        other = differing(taxonomy, built[name].taxonomy)
        if other:
            code, ours, theirs = other[0]
            raise ConfigError(
                f"{f}: models.{name}.taxonomy: {built[name].taxonomy.name} names other categories than the run's "
                f"taxonomy {taxonomy.name} by the same codes ({code}: {theirs!r} vs {ours!r}): give the model a "
                "taxonomy of the run's family or the run one of the model's"
            )
        lacking = [c for c in taxonomy.codes if c not in built[name].taxonomy.codes]
        if lacking:
            raise ConfigError(
                f"{f}: models.{name}.taxonomy: {built[name].taxonomy.name} (less its exclude_codes) lacks "
                f"{', '.join(lacking)} of the run's taxonomy {taxonomy.name}: add `exclude_codes: "
                f"[{', '.join(lacking)}]` to the params (drops them from the labels) or choose another taxonomy"
            )
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{f}: seed: {seed!r} must be an integer")
    columns = _columns(f"{f}: dataset", raw.get("dataset"), taxonomy.complete().codes)
    return Config(f, raw, sem, cal, taxonomy, tuple(chosen), tuple(built[n] for n in names), seed, columns)  # type: ignore[arg-type]


class _Taxonomies:
    """The built-in taxonomies and the params file's own (``taxonomies:``)."""

    def __init__(self, f: str, raw: dict) -> None:
        self.custom: dict[str, Taxonomy] = {}
        for name, spec in _mapping(f"{f}: taxonomies", raw.get("taxonomies")).items():
            if name in BUILTIN:
                raise ConfigError(f"{f}: taxonomies.{name}: shadows a built-in taxonomy")
            try:
                self.custom[name] = taxonomy_from_mapping(name, spec, f"{f}: taxonomies.{name}")
            except TaxonomyError as e:
                raise ConfigError(str(e)) from None

    def get(self, where: str, name: object) -> Taxonomy:
        try:
            return get_taxonomy(str(name), self.custom)
        except TaxonomyError as e:
            raise ConfigError(f"{where}: {e}") from None


@dataclass(frozen=True)
class _ModelDefaults:
    prompt: str
    device: str
    dtype: str
    base_dir: Path


def _strategies(
    f: str, raw: dict, strategies: Sequence[str] | None
) -> tuple[dict[str, dict[str, float | int]], list[str]]:
    """(each strategy's params from ``strategies:``, the strategies that run, in registry order)."""
    strat_raw = _mapping(f"{f}: strategies", raw.get("strategies"))
    for name in strat_raw:
        if name not in REGISTRY:
            raise ConfigError(f"{f}: strategies.{name}: unknown strategy; known: {', '.join(REGISTRY)}")
    base = {s: _params(f"{f}: strategies.{s}", strat_raw.get(s)) for s in REGISTRY}
    # With a `strategies:` section, only the strategies listed there run (unless --strategies says).
    chosen = list(strategies) if strategies else [s for s in REGISTRY if not strat_raw or s in strat_raw]
    for s in chosen:
        if s not in REGISTRY:
            raise ConfigError(f"--strategies: unknown strategy {s!r}; known: {', '.join(REGISTRY)}")
    return base, [s for s in REGISTRY if s in chosen]  # registry order, no duplicates


def _model(
    f: str,
    name: str,
    value: object,
    base: dict[str, dict[str, float | int]],
    chosen: list[str],
    taxonomy: Taxonomy,
    taxonomies: _Taxonomies,
    defaults: _ModelDefaults,
) -> ModelConfig:
    """One ``models.<name>`` entry (or none) resolved against the file's defaults."""
    where = f"{f}: models.{name}"
    entry = _mapping(where, value, MODEL_KEYS)
    shared = _params(where, {k: v for k, v in entry.items() if k in PARAM_KEYS})
    per = _mapping(f"{where}.strategies", entry.get("strategies"))
    for s in per:
        if s not in REGISTRY:
            raise ConfigError(f"{where}.strategies.{s}: unknown strategy; known: {', '.join(REGISTRY)}")
    resolved = {
        s: StrategyParams(**{**base[s], **shared, **_params(f"{where}.strategies.{s}", per.get(s))}) for s in REGISTRY
    }
    prompt = _prompt(f"{where}.prompt", entry["prompt"], defaults.base_dir) if "prompt" in entry else defaults.prompt
    m_tax = taxonomies.get(f"{where}.taxonomy", entry.get("taxonomy", taxonomy.name)).complete()
    run_excluded = [c for c in taxonomy.excluded_codes if c in m_tax.codes]
    m_tax = _without(f"{where}.exclude_codes", m_tax, entry.get("exclude_codes"), run_excluded)
    return ModelConfig(
        name,
        prompt,
        m_tax,
        _string(f"{where}.answer_prefix", entry.get("answer_prefix"), ""),
        _device(f"{where}.device", _string(f"{where}.device", entry.get("device"), defaults.device)),
        _choice(f"{where}.dtype", entry.get("dtype", defaults.dtype), Dtype),
        {s: resolved[s] for s in chosen},
    )


def _without(where: str, taxonomy: Taxonomy, value: object, also: Sequence[str] = ()) -> Taxonomy:
    """``taxonomy`` less the codes listed at ``where`` (a list of its codes) and ``also``."""
    if value is None:
        value = []
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise ConfigError(f"{where}: {value!r} must be a list of category codes")
    try:
        out = taxonomy.without([*also, *value])
    except TaxonomyError as e:
        raise ConfigError(f"{where}: {e}") from None
    if not out.codes:
        raise ConfigError(f"{where}: leaves taxonomy {taxonomy.name} without a category")
    return out
