"""Each choice defined once (tier a): the enums, the one check, and every reader using them."""

from __future__ import annotations

import pytest

from tokmarg.choices import ChoiceError, Dtype, Format, Semantics, choose, device_kind
from tokmarg.config import ConfigError, build_config
from tokmarg.settings import EngineOptions, EvalSettings, SettingsError


def test_choose_reads_members_and_aliases_and_refuses_the_rest() -> None:
    assert choose(Semantics, "paper", "x") is Semantics.PAPER and Semantics.PAPER == "paper"
    assert choose(Dtype, "bfloat16", "x") is Dtype.BF16
    with pytest.raises(ChoiceError, match=r"^--format: 'yaml' is not allowed; allowed: jsonl, parquet, csv$"):
        choose(Format, "yaml", "--format")
    assert device_kind("cuda:3", "d") == "cuda" and device_kind("cpu", "d") == "cpu"
    with pytest.raises(ChoiceError, match="allowed: auto, cpu, cuda, cuda:N"):
        device_kind("gpu0", "--device")


def test_settings_and_params_share_the_check(tmp_path) -> None:
    s = EvalSettings(params=tmp_path / "p", dataset=tmp_path / "d", dtype="float16", semantics="exact")
    assert s.dtype is Dtype.FP16 and s.semantics is Semantics.EXACT
    with pytest.raises(SettingsError, match=r"--engine: 'turbo' is not allowed; allowed: fast, reference"):
        EngineOptions(engine="turbo")
    p = tmp_path / "params.yaml"
    p.write_text("semantics: exactly\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"semantics: 'exactly' is not allowed; allowed: exact, paper"):
        build_config(p)
    p.write_text("models:\n  m: {dtype: half}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"models\.m\.dtype: 'half' is not allowed; allowed: auto, fp32, bf16, fp16"):
        build_config(p, ["m"])
    p.write_text("models:\n  m: {device: tpu}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"models\.m\.device: 'tpu' is not allowed"):
        build_config(p, ["m"])
