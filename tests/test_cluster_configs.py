"""The cluster configs in cluster/: Ray's own launcher validation, the KubeRay manifests, the scripts.

Fast (no cluster is started, no cloud is called): the launcher config goes through the same
prepare_config + validate_config that `ray up` runs before it touches AWS.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "aws-gpu.yaml"
RAYJOB = CLUSTER / "rayjob.yaml"
VOLUMES = CLUSTER / "rayjob-volumes.yaml"
LOCAL = CLUSTER / "local_cluster.sh"
ENTRYPOINT = CLUSTER / "rayjob-entrypoint.sh"
BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None, reason="bash not found")


# --- (a) cluster launcher config -------------------------------------------------------------


def _ray_validate(config: dict) -> dict:
    """What `ray up` does to a config before any cloud call: merge defaults, then validate."""
    util = pytest.importorskip("ray.autoscaler._private.util")
    pytest.importorskip("jsonschema")
    prepared = util.prepare_config(copy.deepcopy(config))
    util.validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def test_launcher_config_passes_ray_validation(launcher):
    prepared = _ray_validate(launcher)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(lambda c: c.update(no_such_field=1), id="unknown-top-level-key"),
        pytest.param(lambda c: c["available_node_types"]["ray.worker.gpu"].update(min_workers="one"), id="bad-type"),
        pytest.param(lambda c: c["available_node_types"]["ray.worker.gpu"]["resources"].update(GPU=-1), id="neg-gpu"),
        pytest.param(lambda c: c.update(head_node_type="ray.head.missing"), id="unknown-head-type"),
        pytest.param(lambda c: c["available_node_types"]["ray.worker.gpu"].update(min_workers=99), id="min>max"),
    ],
)
def test_ray_validation_rejects_a_broken_copy(launcher, breakage):
    import jsonschema

    broken = copy.deepcopy(launcher)
    breakage(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _ray_validate(broken)


def test_launcher_gpu_workers_and_install(launcher):
    worker = launcher["available_node_types"]["ray.worker.gpu"]
    assert worker["resources"]["GPU"] == 1
    assert 0 <= worker["min_workers"] <= worker["max_workers"] <= launcher["max_workers"]
    assert launcher["available_node_types"][launcher["head_node_type"]]["resources"].get("GPU", 0) == 0
    setup = " ".join(launcher["worker_setup_commands"] + launcher["head_setup_commands"])
    assert "pip install" in setup and "torch" in setup and "~/tokmarg" in setup
    # The mounted sources are what pip installs; they must exist relative to the repo root.
    for remote, local in launcher["file_mounts"].items():
        if remote.startswith("~/tokmarg"):
            assert (ROOT / local).exists(), local


def test_launcher_keeps_dashboard_local_and_auth_on(launcher):
    head = " ".join(launcher["head_start_ray_commands"])
    workers = " ".join(launcher["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in head
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers
    assert "~/.ray/auth_token" in launcher["file_mounts"]
    # No inbound rule beyond the launcher's defaults (intra-cluster + SSH): 8265/10001/6379 stay closed.
    assert launcher["provider"]["security_group"]["IpPermissions"] == []


# --- (b) KubeRay manifests ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _values_of(node, key: str) -> list:
    """Every value stored under `key` anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k == key]
        return found + [x for v in node.values() for x in _values_of(v, key)]
    if isinstance(node, list):
        return [x for v in node for x in _values_of(v, key)]
    return []


def test_rayjob_parses_and_names_image_and_entrypoint(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert "tokmarg eval" in spec["entrypoint"] or "rayjob-entrypoint.sh" in spec["entrypoint"]
    assert "--address auto" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    images = {c["image"] for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]] for c in _containers(g)}
    assert len(images) == 1 and all(images)
    # The entrypoint script it calls is in the image (copied from the repo), and quoting-free.
    assert str(ENTRYPOINT.relative_to(ROOT)) in spec["entrypoint"]
    assert not any(ch in spec["entrypoint"] for ch in "'\"$")


@needs_bash
def test_rayjob_entrypoint_starts_then_resumes(rayjob, tmp_path):
    """The manifest's own arguments: a new run gets --out and the inputs, a retry gets --resume only."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "tokmarg"
    fake.write_text('#!/bin/sh\necho "tokmarg $*"\n')
    fake.chmod(0o755)
    words = rayjob["spec"]["entrypoint"].split()
    script_at = next(i for i, w in enumerate(words) if w.endswith("rayjob-entrypoint.sh"))
    run_dir = tmp_path / "results" / "run"
    args = [str(run_dir), *words[script_at + 2 :]]
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}

    def entry() -> str:
        proc = subprocess.run([BASH, str(ENTRYPOINT), *args], capture_output=True, text=True, env=env, timeout=10)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    first = entry()
    assert first.startswith("tokmarg eval --models ") and first.endswith(f"--out {run_dir}")
    assert "--address auto" in first and " -- " not in first
    (run_dir / "run.json").parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text("{}")
    again = entry()
    assert again.startswith(f"tokmarg eval --resume {run_dir} --address auto")
    assert "--models" not in again and "--partition-size" not in again


def test_rayjob_gpu_workers_head_without_gpu(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    for c in _containers(head):
        assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})
    workers = cluster["workerGroupSpecs"]
    assert workers
    for group in workers:
        assert group["rayStartParams"]["num-gpus"] == "1"
        limits = _containers(group)[0]["resources"]["limits"]
        assert str(limits["nvidia.com/gpu"]) == "1"
        # rayStartParams is map[string]string in the CRD.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())


def test_rayjob_security_and_results_volume(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    assert set(_values_of(rayjob, "serviceType")) <= {"ClusterIP"}
    assert not cluster["headGroupSpec"].get("enableIngress", False)
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in cluster["headGroupSpec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    volume_docs = list(yaml.safe_load_all(VOLUMES.read_text()))
    pvcs = {d["metadata"]["name"] for d in volume_docs if d["kind"] == "PersistentVolumeClaim"}
    assert claims and claims <= pvcs
    assert "/results/" in rayjob["spec"]["entrypoint"]


# --- (c) scripts --------------------------------------------------------------------------------


@needs_bash
@pytest.mark.parametrize("script", [LOCAL, ENTRYPOINT], ids=lambda p: p.name)
def test_scripts_parse(script):
    subprocess.run([BASH, "-n", str(script)], check=True)


@needs_bash
@pytest.mark.parametrize(
    "args", [[], ["bogus"], ["start", "1", "extra"], ["stop", "now"], ["kill-node"], ["kill-node", "1", "2"]], ids=repr
)
def test_local_cluster_usage_on_bad_arguments(args, tmp_path):
    # RAY points nowhere: the usage path must not need Ray (and must not start anything).
    env = {"PATH": "/usr/bin:/bin", "RAY": str(tmp_path / "no-ray"), "HOME": str(tmp_path)}
    proc = subprocess.run([BASH, str(LOCAL), *args], capture_output=True, text=True, env=env, timeout=10)
    assert proc.returncode != 0
    assert "usage:" in proc.stderr
    assert "start [N_WORKERS]" in proc.stderr


@needs_bash
def test_local_cluster_rejects_bad_worker_count(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "RAY": str(tmp_path / "no-ray"), "HOME": str(tmp_path)}
    proc = subprocess.run([BASH, str(LOCAL), "start", "two"], capture_output=True, text=True, env=env, timeout=10)
    assert proc.returncode != 0
    assert "N_WORKERS" in proc.stderr


@needs_bash
@pytest.mark.parametrize("node", ["0", "head", "-1"])
def test_local_cluster_kill_node_takes_a_worker_number(node, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "RAY": str(tmp_path / "no-ray"), "HOME": str(tmp_path)}
    proc = subprocess.run([BASH, str(LOCAL), "kill-node", node], capture_output=True, text=True, env=env, timeout=10)
    assert proc.returncode != 0
    assert "worker node number" in proc.stderr


@needs_bash
def test_entrypoint_usage_without_run_dir():
    proc = subprocess.run([BASH, str(ENTRYPOINT)], capture_output=True, text=True, timeout=10)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr
