"""Distributed evaluation on a real local multi-node Ray cluster (marker ``ray``).

``cluster/local_cluster.sh`` starts a head and a worker node on this machine (1 CPU each,
separate raylets), and `tokmarg eval --address` runs as its own process, as a user runs it.
The drivers are separate processes so that a test can kill one, or one of its actors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from tokmarg.cli import app
from tokmarg.strategies import REGISTRY

# file_per_partition: these tests watch partition files appear mid-run
pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("file_per_partition")]
REPO = Path(__file__).resolve().parents[1]
SMOL = "smollm2-135m-instruct"
PORT, PORT_BASE = 6391, 23000  # away from a user's own cluster on the defaults
CLUSTER_ENV = {
    "TOKMARG_RAY_PORT": str(PORT),
    "TOKMARG_PORT_BASE": str(PORT_BASE),
    "TOKMARG_DASHBOARD_PORT": "8291",
    "TOKMARG_CLIENT_PORT": "10091",
    "TOKMARG_NODE_CPUS": "1",
    "RAY": str(Path(sys.executable).parent / "ray"),
}
N = 12  # samples


@pytest.fixture(scope="module")
def cluster() -> str:
    from tokmarg.models import converted_dir

    converted_dir(SMOL)  # convert the GGUF once here, not in two actors at the same time
    script = str(REPO / "cluster" / "local_cluster.sh")
    env = {**os.environ, **CLUSTER_ENV}
    for _ in range(2):  # a second try: on a loaded 2-core machine `ray start` can time out once
        subprocess.run([script, "stop"], env=env, capture_output=True, timeout=120)
        started = subprocess.run([script, "start", "1"], env=env, capture_output=True, text=True, timeout=180)
        if started.returncode == 0:
            break
    assert started.returncode == 0, started.stderr
    try:
        yield f"127.0.0.1:{PORT}"
    finally:
        subprocess.run([script, "stop"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from conftest import write_run_inputs

    return write_run_inputs(tmp_path_factory.mktemp("ray-inputs"), N)


def _args(models: list[str], inputs: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    data, params = inputs
    return ["eval", "--models", *models, "--dataset", str(data), "--params", str(params), "--out", str(out), *extra]


def _driver(args: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(
        [sys.executable, "-m", "tokmarg", *args, "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO,
    )


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def _pred(out: Path) -> pd.DataFrame:
    df = pd.concat(pd.read_parquet(p) for p in sorted((out / "predictions").glob("*.parquet")))
    return df.sort_values(["model", "strategy", "sample_id"]).reset_index(drop=True)


def _assert_exactly_once(out: Path, models: list[str]) -> pd.DataFrame:
    pred = _pred(out)
    assert len(pred) == len(models) * len(REGISTRY) * N
    assert not pred.duplicated(["model", "strategy", "sample_id"]).any()
    assert set(pred.model) == set(models)
    return pred


def _wait_for(cond, timeout: float, proc: subprocess.Popen | None = None) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"driver ended early:\n{proc.stdout.read() if proc.stdout else ''}")
        if time.monotonic() - t0 > timeout:
            pytest.fail("timed out")
        time.sleep(0.2)


def _parts(out: Path) -> dict[str, tuple[int, int]]:
    # finished partitions only: a driver killed mid-write leaves a `.part-*.tmp` that a resume removes
    files = out.glob("partitions/*/part-*.parquet")
    return {str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}


def _actor_pids() -> list[int]:
    res = subprocess.run(["pgrep", "-f", "ray::RayWorker"], capture_output=True, text=True)
    return [int(p) for p in res.stdout.split()]


def test_two_models_on_two_nodes_match_one_process(cluster: str, inputs, tiny_model_dir: Path, tmp_path: Path) -> None:
    models = [SMOL, str(tiny_model_dir)]
    out = tmp_path / "ray-run"
    log = _finish(_driver(_args(models, inputs, out, "--address", cluster, "--partition-size", "3")))
    assert f"Ray cluster at {cluster}; dashboard: http://127.0.0.1:8291" in log
    assert "f1_micro (higher is better)" in log  # the strategy x model table
    manifest = json.loads((out / "manifest.json").read_text())
    actors = manifest["launch"]["workers"]
    assert sorted(a["actor"] for a in actors) == sorted(f"tokmarg/{m}/0" for m in models)
    assert len({a["node_id"] for a in actors}) == 2  # one actor per node: 1 CPU each
    assert all(a["threads"] == 1 for a in actors)
    pred = _assert_exactly_once(out, models)

    local = tmp_path / "local-run"
    res = CliRunner().invoke(
        app, [*_args(models, inputs, local, "--partition-size", "3", "--no-ray", "--cpus-per-actor", "1")]
    )
    assert res.exit_code == 0, res.output
    ref = _pred(local)
    cols = ["scores", "pred_labels", "unexplored_mass", "greedy_text", "uncertainty", "gate_unsafe"]
    pd.testing.assert_frame_equal(
        pred[["model", "strategy", "sample_id", *cols]], ref[["model", "strategy", "sample_id", *cols]]
    )
    timing = ["seconds_per_sample"]
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "metrics.csv").drop(columns=timing), pd.read_csv(local / "metrics.csv").drop(columns=timing)
    )
    for name in ("generalization_f1_micro", "ranking_agreement_f1_micro", "threshold_transfer"):
        pd.testing.assert_frame_equal(
            pd.read_csv(out / "tables" / f"{name}.csv"), pd.read_csv(local / "tables" / f"{name}.csv")
        )


def test_killed_actor_is_restarted_and_nothing_is_lost(cluster: str, inputs, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _driver(_args([SMOL], inputs, out, "--address", cluster, "--partition-size", "2"))
    _wait_for(lambda: len(_parts(out)) >= 1, 300, proc)
    pids = _actor_pids()
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGKILL)  # the actor's worker process, mid-run
    log = _finish(proc)
    _assert_exactly_once(out, [SMOL])
    assert len(_parts(out)) == N // 2
    (actor,) = json.loads((out / "manifest.json").read_text())["launch"]["workers"]
    assert pids[0] in actor["pids_seen"] and len(actor["pids_seen"]) == 2, log
    assert actor["num_restarts"] >= 1


def test_killed_driver_resumes_only_unfinished_partitions(cluster: str, inputs, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _driver(_args([SMOL], inputs, out, "--address", cluster, "--partition-size", "2"))
    _wait_for(lambda: len(_parts(out)) >= 2, 300, proc)
    proc.kill()
    proc.wait()
    before = _parts(out)
    assert 2 <= len(before) < N // 2 and not (out / "manifest.json").exists()
    log = _finish(_driver(["eval", "--resume", str(out), "--address", cluster]))
    assert f"{len(before)} of {N // 2} partitions done, {N // 2 - len(before)} to do" in log
    after = _parts(out)
    assert {k: after[k] for k in before} == before  # finished partitions were not redone
    _assert_exactly_once(out, [SMOL])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["partitions"]["done_before_this_session"] == len(before)
    assert manifest["launch"]["partitions_run"] == N // 2 - len(before)


def test_model_that_fails_to_load_fails_the_run_early(cluster: str, inputs, tiny_model_dir: Path, tmp_path: Path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    out = tmp_path / "run"
    proc = _driver(_args([str(tiny_model_dir), str(empty)], inputs, out, "--address", cluster))
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, text
    assert "Traceback" not in text
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot load model '{empty}'"), text
    assert not out.exists()


def test_custom_metrics_reach_the_metrics_endpoint(cluster: str, inputs, tiny_model_dir: Path, tmp_path: Path):
    out = tmp_path / "run"
    _finish(_driver(_args([str(tiny_model_dir)], inputs, out, "--address", cluster, "--partition-size", "4")))
    ports = [PORT_BASE + 4, PORT_BASE + 104]  # metrics export port of the head and of the worker node

    def scraped() -> str:
        text = ""
        for p in ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=5) as r:
                    text += r.read().decode()
            except OSError:
                pass
        return text

    _wait_for(lambda: "tokmarg_samples_done" in scraped(), 60)
    text = scraped()
    for name in ("tokmarg_samples_done", "tokmarg_tokens_forwarded", "tokmarg_partition_seconds"):
        assert name in text


def test_local_ray_instance_with_two_cpu_actors(inputs, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    log = _finish(_driver(_args([str(tiny_model_dir)], inputs, out, "--replicas", "2", "--partition-size", "2")))
    assert "local Ray instance; dashboard: http://127.0.0.1:" in log
    launch = json.loads((out / "manifest.json").read_text())["launch"]
    assert launch["address"] == "local" and len(launch["workers"]) == 2  # one may be released before it was ready
    assert any(a["ready"] for a in launch["workers"]) and launch["slots"] == 2
    assert launch["cpus_per_actor"] * 2 <= os.cpu_count()  # CPU actors share the cores, no oversubscription
    _assert_exactly_once(out, [str(tiny_model_dir)])


def test_error_inside_a_partition_is_one_line(cluster: str, inputs, tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    refusing = tmp_path / "refusing-model"
    shutil.copytree(tiny_model_dir, refusing)
    (refusing / "chat_template.jinja").write_text("{{ raise_exception('refused by the test') }}", encoding="utf-8")
    out = tmp_path / "run"
    proc = _driver(_args([str(refusing)], inputs, out, "--address", cluster, "--max-restarts", "0"))
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, text
    assert "Traceback" not in text
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "the chat template refused it: refused by the test" in errors[0], text
    assert not out.exists()


def test_score_on_the_cluster_writes_what_one_process_writes(
    cluster: str, labeled_run: dict, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(labeled_run["out"], run)
    res = CliRunner().invoke(app, ["calibrate", str(run), "--folds", "3", "--min-positives", "3"])
    assert res.exit_code == 0, res.output
    policy = next((run / "policies").glob("*__token_probability.yaml"))
    data = labeled_run["dir"] / "data.jsonl"
    base = ["score", "--policy", str(policy), "--dataset", str(data)]
    local = tmp_path / "local"
    res = CliRunner().invoke(app, [*base, "--out", str(local), "--no-ray", "--no-progress"])
    assert res.exit_code == 0, res.output
    far = tmp_path / "cluster"
    log = _finish(_driver([*base, "--out", str(far), "--address", cluster, "--replicas", "2"]))
    assert "dashboard" in log
    a = pd.read_parquet(local / "scores.parquet")
    b = pd.read_parquet(far / "scores.parquet")
    assert list(a["id"]) == list(b["id"]) and list(a["flagged"]) == list(b["flagged"])
    for x, y in zip(a["category_scores"], b["category_scores"]):
        assert x.keys() == y.keys() and all(abs(x[k] - y[k]) <= 1e-9 for k in x)
    assert (far / "scores.jsonl").read_text() == (local / "scores.jsonl").read_text()
    # another model is refused where the actor loads it: one line, nothing written
    out = tmp_path / "refused"
    proc = _driver([*base, "--out", str(out), "--address", cluster, "--models", str(tiny_model_dir)])
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, text
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "is not the model" in errors[0] and "Traceback" not in text, text
    assert not out.exists()
