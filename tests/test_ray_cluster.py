"""Runs where users launch them (marker ``ray``): more actors than the cluster holds (waves),
the cluster's own auth mode, GPUs one model each, a lost node, `ray job submit` / `ray job
stop` / `--resume`, and the packaged defaults from an empty directory.

Each test starts the clusters it needs with ``cluster/local_cluster.sh`` (separate raylets on
this machine, ports away from a user's) and checks that none of their processes is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest

from tokmarg.strategies import REGISTRY

# file_per_partition: these tests watch partition files appear mid-run
pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("file_per_partition")]
REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "cluster" / "local_cluster.sh")
RAY = str(Path(sys.executable).parent / "ray")
N = 12
SMOL = "smollm2-135m-instruct"


def _cluster_env(port: int, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "RAY": RAY,
        "TOKMARG_RAY_PORT": str(port),
        "TOKMARG_PORT_BASE": str(40000 + 1000 * (port - 6400)),
        "TOKMARG_DASHBOARD_PORT": str(8300 + port - 6400),
        "TOKMARG_CLIENT_PORT": str(10100 + port - 6400),
        "TOKMARG_NODE_CPUS": "1",
        **extra,
    }


def _cluster_pids(port: int) -> list[str]:
    """Processes of that cluster (its temp dir is in their command lines or environment)."""
    res = subprocess.run(["pgrep", "-f", f"tokmarg_ray_{port}"], capture_output=True, text=True)
    return res.stdout.split()


@contextmanager
def local_cluster(port: int, workers: int, **extra: str):
    env = _cluster_env(port, **extra)
    for _ in range(2):  # a second try: on a loaded 2-core machine `ray start` can time out once
        subprocess.run([SCRIPT, "stop"], env=env, capture_output=True, timeout=120)
        started = subprocess.run([SCRIPT, "start", str(workers)], env=env, capture_output=True, text=True, timeout=180)
        if started.returncode == 0:
            break
    assert started.returncode == 0, started.stderr
    try:
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([SCRIPT, "stop"], env=env, capture_output=True, timeout=120)
        time.sleep(1)
        assert _cluster_pids(port) == [], "Ray processes left behind"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from conftest import write_run_inputs

    return write_run_inputs(tmp_path_factory.mktemp("ray-cluster-inputs"), N)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    from conftest import build_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    return [str(build_tiny_model(root / f"tiny-{seed}", seed=seed)) for seed in (1, 2, 3)]


def _eval(models: list[str], inputs: tuple[Path, Path], out: Path, *extra: str, env: dict | None = None,
          cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess:  # fmt: skip
    data, params = inputs
    args = ["eval", "--models", *models, "--dataset", str(data), "--params", str(params), "--out", str(out)]
    return _tokmarg([*args, "--no-progress", "--no-report", *extra], env=env, cwd=cwd, timeout=timeout)


def _driver_env(env: dict | None = None) -> dict[str, str]:
    """The user's environment: no RAY_ADDRESS and no RAY_AUTH_MODE (tokmarg must find the mode)."""
    return {k: v for k, v in (env or os.environ).items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}


def _tokmarg(args: list[str], env: dict | None = None, cwd: Path = REPO, timeout: float = 600):
    return subprocess.run([sys.executable, "-m", "tokmarg", *args], env=_driver_env(env), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def _exactly_once(out: Path, models: list[str]) -> pd.DataFrame:
    df = pd.concat(pd.read_parquet(p) for p in sorted((out / "predictions").glob("*.parquet")))
    assert len(df) == len(models) * len(REGISTRY) * N
    assert not df.duplicated(["model", "strategy", "sample_id"]).any()
    assert set(df.model) == set(models)
    return df


def _launch(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["launch"]


def _one_error_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr
    return errors[0]


def _wait_for(cond, timeout: float) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            pytest.fail("timed out")
        time.sleep(0.2)


def _finished_parts(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_ino for p in out.glob("partitions/*/part-*.parquet")}


# ---------------------------------------------------------------- waves, auth (token), job submit


@pytest.fixture(scope="module")
def two_nodes():
    """A fixed cluster of two 1-CPU nodes with token auth (~/.ray/auth_token holds its token)."""
    with local_cluster(6401, 1) as c:
        yield c


def test_three_models_on_two_one_cpu_nodes_run_in_waves(two_nodes, inputs, tiny_models, tmp_path: Path) -> None:
    address, _ = two_nodes
    out = tmp_path / "run"
    res = _eval(tiny_models, inputs, out, "--address", address, "--cpus-per-actor", "1", "--partition-size", "4")
    assert res.returncode == 0, res.stderr
    assert "models run in waves" in res.stderr
    _exactly_once(out, tiny_models)
    launch = _launch(out)
    assert launch["slots"] == 2 and launch["auth_mode"] == "token"  # the cluster's mode, found by asking it
    order = launch["waves"]
    assert [w["model"] for w in order] == tiny_models  # in the order given
    # the third model's actor was created only once one of the first two had finished
    assert order[2]["created"] >= min(order[0]["finished"], order[1]["finished"])
    assert len({a["node_id"] for a in launch["workers"]}) == 2
    # the dashboard's Actors page shows each actor's repr: its model and progress
    env = {**two_nodes[1], "RAY_AUTH_MODE": "token"}
    dash = f"http://127.0.0.1:{env['TOKMARG_DASHBOARD_PORT']}"
    cmd = [RAY, "list", "actors", "--address", dash, "--detail", "--format", "json", "--limit", "100"]
    listed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    reprs = [a.get("repr_name", "") for a in json.loads(listed.stdout) if a.get("ray_namespace") == launch["namespace"]]
    assert any(r.startswith(f"tokmarg {tiny_models[0]} replica 0:") and "partitions" in r for r in reprs), reprs


def test_three_replicas_on_two_one_cpu_nodes(two_nodes, inputs, tiny_models, tmp_path: Path) -> None:
    address, _ = two_nodes
    out = tmp_path / "run"
    res = _eval(tiny_models[:1], inputs, out, "--address", address, "--cpus-per-actor", "1", "--replicas", "3",
                "--partition-size", "2")  # fmt: skip
    assert res.returncode == 0, res.stderr
    _exactly_once(out, tiny_models[:1])
    actors = _launch(out)["workers"]
    assert len(actors) == 3 and sum(a["ready"] for a in actors) >= 1


def test_ray_job_submit_then_stop_and_resume(two_nodes, inputs, tiny_models, tmp_path: Path) -> None:
    """`ray job submit` as users run it; a job stopped mid-run and resubmitted with --resume
    completes with nothing twice, and `ray job logs` stays readable."""
    address, env = two_nodes
    jobs = ["--address", f"http://127.0.0.1:{env['TOKMARG_DASHBOARD_PORT']}"]
    cli_env = {**env, "RAY_AUTH_MODE": "token"}  # Ray's own CLI sends the token only in token mode
    data, params = inputs

    def submit(job_id: str, *args: str) -> None:
        entry = [sys.executable, "-m", "tokmarg", "eval", "--address", "auto", *args]
        res = subprocess.run([RAY, "job", "submit", *jobs, "--submission-id", job_id, "--no-wait", "--", *entry],
                             env=cli_env, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert res.returncode == 0, res.stderr

    def status(job_id: str) -> str:  # Ray's CLI logs it to stderr: "Job 'x' succeeded", "... was stopped"
        res = subprocess.run([RAY, "job", "status", *jobs, job_id], env=cli_env, capture_output=True, text=True)
        text = (res.stdout + res.stderr).lower()
        return next((w.upper() for w in ("succeeded", "failed", "stopped", "running", "pending") if w in text), "")

    def wait_done(job_id: str) -> str:
        _wait_for(lambda: status(job_id) in ("SUCCEEDED", "FAILED", "STOPPED"), 600)
        return status(job_id)

    run_args = ["--models", tiny_models[0], "--dataset", str(data), "--params", str(params), "--no-report"]
    out = tmp_path / "run"
    submit("tokmarg-a", *run_args, "--out", str(out), "--partition-size", "2")
    assert wait_done("tokmarg-a") == "SUCCEEDED"
    _exactly_once(out, tiny_models[:1])
    logs = subprocess.run([RAY, "job", "logs", *jobs, "tokmarg-a"], env=cli_env, capture_output=True, text=True)
    assert "\r" not in logs.stdout and f"{N}/{N} samples" in logs.stdout  # plain progress lines, no redraws
    assert len(logs.stdout.splitlines()) < 60, logs.stdout

    out2 = tmp_path / "stopped"  # SmolLM2: slow enough (~1 s a partition here) to stop mid-run
    smol_args = ["--models", SMOL, *run_args[2:]]
    submit("tokmarg-b", *smol_args, "--out", str(out2), "--partition-size", "1")
    _wait_for(lambda: len(_finished_parts(out2)) >= 2, 300)
    subprocess.run([RAY, "job", "stop", *jobs, "tokmarg-b"], env=cli_env, capture_output=True, timeout=120)
    assert wait_done("tokmarg-b") == "STOPPED"
    before = _finished_parts(out2)
    assert 2 <= len(before) < N
    submit("tokmarg-c", "--resume", str(out2))
    assert wait_done("tokmarg-c") == "SUCCEEDED"
    _exactly_once(out2, [SMOL])
    after = _finished_parts(out2)
    assert all(after[p] == ino for p, ino in before.items())  # finished partitions were not redone


# ---------------------------------------------------------------- a cluster without token auth


def test_cluster_without_token_auth_while_a_token_file_exists(inputs, tiny_models, tmp_path: Path) -> None:
    # the case of the issue: a token left by any earlier local Ray start (made here if missing)
    subprocess.run([RAY, "get-auth-token", "--generate"], capture_output=True, timeout=60)
    assert Path("~/.ray/auth_token").expanduser().is_file()
    with local_cluster(6402, 1, RAY_AUTH_MODE="disabled") as (address, _):
        out = tmp_path / "run"
        res = _eval(tiny_models[:1], inputs, out, "--address", address, "--replicas", "2")
        assert res.returncode == 0, res.stderr
        _exactly_once(out, tiny_models[:1])
        assert _launch(out)["auth_mode"] == "disabled"


# ---------------------------------------------------------------- GPUs


def test_gpus_one_model_each_and_shared_halves(inputs, tiny_models, tmp_path: Path) -> None:
    """A node declaring 2 GPUs (this machine has none: --device cpu): two models at 1 GPU each
    get distinct GPUs; four actors at 0.5 share them two per GPU; with --device auto an actor
    given a GPU it cannot see stops the run in one line."""
    with local_cluster(6403, 0, TOKMARG_NODE_GPUS="2", TOKMARG_HEAD_CPUS="2") as (address, _):
        common = ["--address", address, "--device", "cpu", "--cpus-per-actor", "0.5", "--partition-size", "1"]
        out = tmp_path / "one-each"
        res = _eval(tiny_models[:2], inputs, out, *common, "--gpus-per-actor", "1")
        assert res.returncode == 0, res.stderr
        actors = [a for a in _launch(out)["workers"] if a["ready"]]
        assert sorted(len(a["gpu_ids"]) for a in actors) == [1, 1]
        assert actors[0]["gpu_ids"] != actors[1]["gpu_ids"]
        assert all(a["cuda_visible_devices"] == a["gpu_ids"][0] for a in actors)

        out = tmp_path / "halves"
        res = _eval(tiny_models[:2], inputs, out, *common, "--gpus-per-actor", "0.5", "--replicas", "2")
        assert res.returncode == 0, res.stderr
        launch = _launch(out)
        assert launch["slots"] == 4
        per_gpu: dict[str, int] = {}
        for a in launch["workers"]:
            if a["ready"]:
                (gpu,) = a["gpu_ids"]
                per_gpu[gpu] = per_gpu.get(gpu, 0) + 1
        assert per_gpu == {"0": 2, "1": 2}, launch["workers"]  # every actor ran, two on each GPU

        out = tmp_path / "auto"
        res = _eval(tiny_models[:1], inputs, out, "--address", address, "--gpus-per-actor", "1")
        line = _one_error_line(res)
        assert "actor tokmarg/" in line and "on node " in line and "--device cpu" in line
        assert not out.exists()


# ---------------------------------------------------------------- a lost node


def test_lost_node_costs_nothing_and_no_node_left_stops_in_one_line(inputs, tmp_path: Path) -> None:
    """SmolLM2 (slow enough here to be killed mid-run); work stays off the head (0 CPUs): two
    worker nodes hold the model's two replicas. Worker 2
    is killed (its raylet and everything it started) mid-run: its partitions are redone on worker
    1, each result once. Then a run on worker 1 alone loses it: no node can hold the actor, and
    the run stops in one line saying how to resume."""
    with local_cluster(6404, 2, TOKMARG_HEAD_CPUS="0") as (address, env):
        out = tmp_path / "run"
        data, params = inputs
        args = ["eval", "--models", SMOL, "--dataset", str(data), "--params", str(params),
                "--out", str(out), "--no-progress", "--no-report", "--address", address, "--replicas", "2",
                "--cpus-per-actor", "1", "--partition-size", "1"]  # fmt: skip
        proc = subprocess.Popen([sys.executable, "-m", "tokmarg", *args], env=_driver_env(), cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        _wait_for(lambda: len(_finished_parts(out)) >= 1, 300)
        killed = subprocess.run([SCRIPT, "kill-node", "2"], env=env, capture_output=True, text=True)
        assert killed.returncode == 0, killed.stderr
        text, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, text
        assert "is gone; its partitions go to the replicas left" in text  # the kill came mid-run
        _exactly_once(out, [SMOL])

        out = tmp_path / "lost"
        args[args.index("--out") + 1] = str(out)
        args[args.index("--replicas") + 1] = "1"
        proc = subprocess.Popen([sys.executable, "-m", "tokmarg", *args], env=_driver_env(), cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        _wait_for(lambda: len(_finished_parts(out)) >= 1, 300)
        subprocess.run([SCRIPT, "kill-node", "1"], env=env, capture_output=True, timeout=60)
        _, err = proc.communicate(timeout=600)
        res = subprocess.CompletedProcess(args, proc.returncode, "", err)
        line = _one_error_line(res)
        assert "no node left can hold an actor" in line and f"tokmarg eval --resume {out}" in line


# ---------------------------------------------------------------- the packaged defaults


def _raylets() -> int:
    return len(subprocess.run(["pgrep", "-f", "raylet"], capture_output=True, text=True).stdout.split())


def test_eval_from_an_empty_directory_uses_the_packaged_defaults(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    before = _raylets()
    res = _tokmarg(["eval", "--limit", "2", "--no-progress", "--no-report", "--out", "run"], cwd=empty)
    assert res.returncode == 0, res.stderr
    _wait_for(lambda: _raylets() <= before, 30)  # the local instance the run started is gone with it
    manifest = json.loads((empty / "run" / "manifest.json").read_text())
    assert manifest["inputs_from"] == {"params": "packaged defaults", "dataset": "packaged defaults"}
    assert manifest["n_samples"] == 2 and manifest["launch"]["launcher"] == "ray"
    res = _tokmarg(["validate"], cwd=empty)
    assert res.returncode == 0 and "packaged defaults" in res.stdout


def test_an_actor_no_node_can_hold_is_refused_in_one_line(tmp_path: Path) -> None:
    """A local instance: more actors than the cores is fine (waves), one that fits nowhere is not."""
    res = _tokmarg(["eval", "--limit", "2", "--cpus-per-actor", "64", "--out", str(tmp_path / "run")])
    line = _one_error_line(res)
    assert "an actor needs 0 GPU + 64 CPU and no node has that" in line and "--cpus-per-actor" in line
    assert not (tmp_path / "run").exists()
