"""The embedded defaults: `./params.yaml` and `./datasets/sample.jsonl` where the working
directory has them, else the copies inside the package (tier b; the wheel test is slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tokmarg.cli import app
from tokmarg.inputs import PACKAGED, WORKDIR, dataset_file, packaged, params_file

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_packaged_defaults_are_the_checkouts_files() -> None:
    assert packaged("params.yaml").read_bytes() == (REPO / "params.yaml").read_bytes()
    assert packaged("sample.jsonl").read_bytes() == (REPO / "datasets" / "sample.jsonl").read_bytes()


def test_working_directory_first_then_packaged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert params_file(None) == (packaged("params.yaml"), PACKAGED)
    assert dataset_file(None) == (packaged("sample.jsonl"), PACKAGED)
    (tmp_path / "params.yaml").write_text("semantics: paper\n", encoding="utf-8")
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "sample.jsonl").write_text('{"prompt": "hi", "labels": []}\n', encoding="utf-8")
    assert params_file(None) == (Path("params.yaml"), WORKDIR)
    assert dataset_file(None) == (Path("datasets/sample.jsonl"), WORKDIR)
    given = tmp_path / "other.yaml"
    assert params_file(given)[0] == given


def test_validate_from_an_empty_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["validate"])
    assert res.exit_code == 0, res.output
    assert f"from the {PACKAGED}" in res.output and "84 samples" in res.output
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_eval_manifest_says_where_inputs_came_from(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No --params/--dataset in an empty directory: the packaged ones, recorded in the manifest."""
    monkeypatch.chdir(tmp_path)
    args = ["eval", "--models", str(tiny_model_dir), "--limit", "2", "--strategies", "greedy_generation"]
    res = runner.invoke(app, [*args, "--out", "run", "--no-ray", "--no-progress", "--no-report"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["inputs_from"] == {"params": PACKAGED, "dataset": PACKAGED}
    assert manifest["params_file"] == str(packaged("params.yaml").resolve())
    assert manifest["n_samples"] == 2


@pytest.mark.slow
def test_a_built_wheel_runs_from_an_empty_directory(tmp_path: Path) -> None:
    """`pip wheel .` copies the defaults into the wheel (the checkout holds links); installed on
    its own, it validates and scores 2 samples of its packaged sample on the embedded model."""
    py = sys.executable
    wheels, site, empty = tmp_path / "wheels", tmp_path / "site", tmp_path / "empty"
    empty.mkdir()
    pip = [py, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)], check=True)
    (wheel,) = wheels.glob("tokmarg-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    assert (site / "tokmarg" / "defaults" / "params.yaml").is_file()
    assert not (site / "tokmarg" / "defaults" / "params.yaml").is_symlink()
    env = {**os.environ, "PYTHONPATH": str(site)}

    def tokmarg(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([py, "-m", "tokmarg", *args], cwd=empty, env=env, capture_output=True, text=True)

    where = subprocess.run([py, "-c", "import tokmarg; print(tokmarg.__file__)"], cwd=empty, env=env,
                           capture_output=True, text=True, check=True)  # fmt: skip
    assert where.stdout.startswith(str(site))  # the wheel's copy, not the checkout's
    res = tokmarg("validate")
    assert res.returncode == 0 and PACKAGED in res.stdout, res.stderr
    res = tokmarg("eval", "--limit", "2", "--strategies", "greedy_generation", "--no-ray", "--no-progress",
                  "--no-report", "--out", "run")  # fmt: skip
    assert res.returncode == 0, res.stderr
    manifest = json.loads((empty / "run" / "manifest.json").read_text())
    assert manifest["inputs_from"] == {"params": PACKAGED, "dataset": PACKAGED} and manifest["n_samples"] == 2
    assert manifest["models"] == ["smollm2-135m-instruct"]
