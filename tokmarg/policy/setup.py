"""What scoring with a policy runs: the config it implies, checked against the policy.

A policy fixes the taxonomy (and excluded codes), the semantics, the strategy and its parameters,
and the model's prompt (format, answer prefix, the taxonomy the prompt shows). ``--params`` may add
what a policy does not say (a custom taxonomy's definition, a prompt template's path on this
machine, a model's device or dtype); whatever it says about the rest must resolve to the policy's,
or scoring is refused in one line naming the difference. The model's files and rendered prompt are
checked where the model loads (:func:`tokmarg.fingerprint.check_identity`).
"""

from __future__ import annotations

from pathlib import Path

from tokmarg.config import Config, build_config
from tokmarg.policy.file import Policy, PolicyError


def policy_params(policy: Policy, user: dict, model: str, where: str = "--params") -> dict:
    """The params of scoring ``model`` with ``policy``: ``user``'s (``--params``, or {}), with
    what they leave unsaid taken from the policy."""
    fixed = {
        "semantics": policy.strategy["semantics"],
        "taxonomy": policy.taxonomy["name"],
        "exclude_codes": list(policy.taxonomy.get("excluded") or []),
    }
    for key, theirs in fixed.items():
        if key in user and user[key] != theirs and not (key == "exclude_codes" and not user[key] and not theirs):
            raise PolicyError(f"{where}: {key}: {user[key]!r} is not the policy's {theirs!r}")
    raw = dict(user)
    raw.setdefault("semantics", policy.strategy["semantics"])
    raw.setdefault("taxonomy", policy.taxonomy["name"])
    raw.setdefault("exclude_codes", list(policy.taxonomy.get("excluded") or []))
    name = policy.strategy["name"]
    strategies = dict(raw.get("strategies") or {})
    strategies.setdefault(name, dict(policy.strategy.get("params") or {}))
    raw["strategies"] = strategies
    models = dict(raw.get("models") or {})
    entry = dict(models.get(model) or {})
    entry.setdefault("prompt", policy.prompt["format"])
    entry.setdefault("answer_prefix", policy.prompt.get("answer_prefix", ""))
    if policy.prompt.get("taxonomy"):
        entry.setdefault("taxonomy", policy.prompt["taxonomy"])
    models[model] = entry
    raw["models"] = models
    return raw


def policy_config(
    policy: Policy, policy_path: Path, model: str, params: Path | None, user: dict, device: str, dtype: str
) -> Config:
    """The :class:`Config` of scoring ``model`` with ``policy`` (one model, one strategy), refused
    (:class:`PolicyError`) where it resolves to other codes, semantics or strategy parameters."""
    raw = policy_params(policy, user, model, str(params))
    where = params or policy_path
    cfg = build_config(where, [model], [policy.strategy["name"]], None, device, dtype, raw=raw)
    src = f"{params}" if params else "the policy"
    if tuple(cfg.taxonomy.codes) != policy.codes:
        raise PolicyError(
            f"{src}: taxonomy {cfg.taxonomy.name} gives the codes {', '.join(cfg.taxonomy.codes)}, not the policy's "
            f"{', '.join(policy.codes)} ({policy_path})"
        )
    if cfg.semantics != policy.strategy["semantics"]:
        raise PolicyError(f"{src}: semantics {cfg.semantics} is not the policy's {policy.strategy['semantics']}")
    mine = vars(cfg.models[0].params[policy.strategy["name"]])
    theirs = policy.strategy.get("params") or {}
    diff = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    if diff:
        k = diff[0]
        raise PolicyError(
            f"{src}: {policy.strategy['name']}.{k} is {mine.get(k)!r}, not the policy's {theirs.get(k)!r} "
            f"({policy_path})"
        )
    return cfg


def expected_identity(policy: Policy, policy_path: Path) -> dict:
    """What the worker compares with what it loaded (:func:`tokmarg.fingerprint.check_identity`)."""
    return {
        "model_sha256": policy.model["sha256"],
        "model_files": dict(policy.model.get("files") or {}),
        "prompt_sha256": policy.prompt["sha256"],
        "dtype": str(policy.model.get("dtype") or ""),  # the scores' precision: bf16 and fp32 differ
        "policy": str(policy_path),
    }
