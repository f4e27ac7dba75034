"""The settings object (tier a, no model): built from command-line options, checked, stored in
run.json and rebuilt from it on resume; the strategy kinds' prediction rules."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tokmarg.errors import TokmargError
from tokmarg.settings import RESULT_FIELDS, SettingsError, from_options
from tokmarg.strategies import CODES, REGISTRY, SCORES, UNCERTAINTY, SampleOutput


def test_options_become_settings_with_defaults_in_one_place(tmp_path: Path) -> None:
    s = from_options({"models": ["a,b", "c"], "strategies": None, "limit": 3, "replicas": 2}, extra=["d"])
    assert s.models == ("a", "b", "c", "d") and s.strategies is None and s.limit == 3
    assert s.launch.replicas == 2 and s.launch.ray and s.launch.dashboard_host == "127.0.0.1"
    assert (s.engine.engine, s.partition_size, s.device, s.dtype) == ("fast", 32, "auto", "auto")
    assert s.params.is_absolute() and s.inputs_from["params"] in ("working directory", "packaged defaults")
    assert isinstance(SettingsError("x"), TokmargError)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"semantics": "both"}, "--semantics: 'both' is not allowed; allowed: exact, paper"),
        ({"engine": "turbo"}, "--engine: 'turbo' is not allowed; allowed: fast, reference"),
        ({"dtype": "fp8"}, "--dtype: 'fp8' is not allowed; allowed: auto, fp32, bf16, fp16"),
        ({"no_ray": True, "replicas": 2}, "--no-ray scores in this process: drop --address, --replicas"),
    ],
)
def test_bad_choices_are_one_line(options: dict, message: str) -> None:
    with pytest.raises(SettingsError) as e:
        from_options(options)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_resume_rebuilds_the_run_from_its_record(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    first = from_options({"dataset": data, "models": ["m"], "semantics": "paper", "engine": "reference", "limit": 5})
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"args": first.record()}))
    # how to run may change on resume (the launch, batch sizes); what decides the results comes from run.json
    again = from_options({"resume": run, "no_ray": True, "batch_size": 4})
    for name in RESULT_FIELDS:
        want = first.engine.engine if name == "engine" else getattr(first, name)
        got = again.engine.engine if name == "engine" else getattr(again, name)
        assert got == want, name
    assert again.out == run and not again.launch.ray and again.engine.batch_size == 4
    with pytest.raises(SettingsError, match=r"run\.json; drop --limit, --engine"):
        from_options({"resume": run, "limit": 2, "engine": "fast"})
    (run / "run.json").write_text(json.dumps({"args": {"models": ["m"]}}))
    with pytest.raises(SettingsError, match="the run was not started by `tokmarg eval`"):
        from_options({"resume": run})


def test_kinds_predict_and_score_as_spec_says() -> None:
    """scores: codes at or above the threshold, unsafe from the unsafe score; codes: the named
    codes, unsafe also when the output says so; uncertainty: the fitted codes."""
    scores = np.array([[0.5, 0.1], [0.2, 0.2]])
    named = np.array([[False, True], [False, False]])
    assert SCORES.codes(scores, named, 0.2).tolist() == [[True, False], [True, True]]
    assert SCORES.unsafe(np.array([0.1, 0.9]), named, np.zeros(2), 0.5).tolist() == [False, True]
    assert CODES.codes(None, named, 0.2) is named
    assert CODES.unsafe(None, named, np.array([0.0, 1.0]), 0.2).tolist() == [True, True]
    assert UNCERTAINTY.unsafe(None, named, np.array([0.0, 1.0]), 0.2).tolist() == [True, False]
    out = SampleOutput({"S1": 0.3, "S2": 0.1}, pred_labels=("S2",))
    assert SCORES.sample_codes(out, 0.2, ("S1", "S2")) == ("S1",)
    assert UNCERTAINTY.sample_codes(out, 0.2, ("S1", "S2")) == ("S2",)
    assert {s.kind.name for s in REGISTRY.values()} == {"scores", "codes", "uncertainty"}
    assert [s.name for s in REGISTRY.values() if s.kind.fitted] == [
        "probability_uncertainty",
        "entropy_uncertainty",
        "LogTokU",
    ]
    assert replace(SCORES, thresholded=False).codes(scores, named, 0.2) is named
