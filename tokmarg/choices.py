"""Every choice among named values, defined once: the command line's options, the settings, the
params loader and the model loader all read these enums, and :func:`choose` is the one check.

A member is a ``str`` (``StrEnum``): it compares equal to its value, is written to JSON and YAML
as it, and reads back from it.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import TypeVar

from tokmarg.errors import TokmargError


class ChoiceError(TokmargError, ValueError):
    """A value that is not one of a choice's; one line naming where it came from."""


class Semantics(StrEnum):
    """How the strategies read a continuation tree (SPEC §1)."""

    EXACT = "exact"
    PAPER = "paper"


class Calibration(StrEnum):
    """How the uncertainty strategies' threshold is fitted (SPEC §2)."""

    TRANSDUCTIVE = "transductive"
    SPLIT = "split"


class Engine(StrEnum):
    """Which engine answers the strategies' logits requests."""

    FAST = "fast"
    REFERENCE = "reference"


class Dtype(StrEnum):
    """The model's weights' precision (``auto``: bf16 on a GPU, fp32 on a CPU)."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class DeviceKind(StrEnum):
    """Where a model runs: ``cuda`` stands for ``cuda`` and ``cuda:N``."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class CalibrationMethod(StrEnum):
    """How ``tokmarg calibrate`` maps a strategy's raw scores to probabilities."""

    ISOTONIC = "isotonic"  # scikit-learn's IsotonicRegression: a monotone step-wise linear map
    PLATT = "platt"  # a logistic regression on the score's logit: sigmoid(a * logit(s) + b)
    NONE = "none"  # the raw score (only the thresholds are fitted)


class Format(StrEnum):
    """A dataset file's format (by default from the file's extension)."""

    JSONL = "jsonl"
    PARQUET = "parquet"
    CSV = "csv"


# other spellings accepted for a member
ALIASES: dict[type, dict[str, StrEnum]] = {
    Dtype: {"float32": Dtype.FP32, "bfloat16": Dtype.BF16, "float16": Dtype.FP16},
}

E = TypeVar("E", bound=StrEnum)


def allowed(kind: type[StrEnum], sep: str = ", ") -> str:
    """The values of ``kind``, for help texts and errors."""
    return sep.join(m.value for m in kind)


def choose(kind: type[E], value: object, where: str, error: type[TokmargError] = ChoiceError) -> E:
    """``value`` as a member of ``kind`` (an alias read as its member).

    Raises:
        error: ``"<where>: 'x' is not allowed; allowed: a, b"``.
    """
    if isinstance(value, str):
        alias = ALIASES.get(kind, {}).get(value)
        if alias is not None:
            return alias  # type: ignore[return-value]
        try:
            return kind(value)
        except ValueError:
            pass
    raise error(f"{where}: {value!r} is not allowed; allowed: {allowed(kind)}")


def device_kind(device: object, where: str, error: type[TokmargError] = ChoiceError) -> DeviceKind:
    """The kind of a device string: auto, cpu, cuda or cuda:N."""
    if isinstance(device, str) and re.fullmatch(r"cuda:\d+", device):
        return DeviceKind.CUDA
    if not isinstance(device, str) or device not in {m.value for m in DeviceKind}:
        raise error(f"{where}: {device!r} is not allowed; allowed: auto, cpu, cuda, cuda:N")
    return DeviceKind(device)
