"""The Ray launcher: one actor per (model, replica), partitions pulled as actors free up.

The worker stays Ray-free; :class:`RayWorker` wraps it at launch with what only Ray needs
(its node, its GPUs, custom metrics), and ``ray.remote(...)`` is applied here, with the
resources and the restart policy of this run. Actors are named ``tokmarg/<model>/<replica>``
in a namespace of their own, so two runs on one cluster never collide. The driver connects
with the cluster's own auth mode (:mod:`tokmarg.launch.auth`).

More actors than the nodes hold at once run in waves (:mod:`tokmarg.launch.waves`, which also
has the failure rules: no lost work, late copies ignored). Results come back to the driver,
which alone writes them (once: see :meth:`tokmarg.rundir.RunDir.write_partitions`).
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace

from tqdm import tqdm

from tokmarg.launch import OnResult, OnState
from tokmarg.launch.auth import ENV as AUTH_ENV
from tokmarg.launch.auth import match_cluster_auth
from tokmarg.launch.waves import Waves
from tokmarg.launch.waves import one_line as _one_line
from tokmarg.records import PartitionResult
from tokmarg.rundir import RunError
from tokmarg.worker import Partition, Worker, WorkerSpec

LATENCY_BOUNDS = [0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800]


class RayWorker:
    """The Ray actor: a :class:`Worker` plus its node, its GPUs and custom metrics."""

    def __init__(self, spec: WorkerSpec, replica: int) -> None:
        import ray
        from ray.util import metrics

        tags = {"model": spec.model.name, "replica": str(replica)}
        keys = tuple(tags)
        self._samples = metrics.Counter("tokmarg_samples_done", "samples scored (all strategies)", tag_keys=keys)
        self._tokens = metrics.Counter("tokmarg_tokens_forwarded", "tokens forwarded through the model", tag_keys=keys)
        self._latency = metrics.Histogram(
            "tokmarg_partition_seconds", "wall time of one partition", boundaries=LATENCY_BOUNDS, tag_keys=keys
        )
        for m in (self._samples, self._tokens, self._latency):
            m.set_default_tags(tags)
        ctx = ray.get_runtime_context()
        self._where = {
            "actor": ctx.get_actor_name(),
            "node_id": ctx.get_node_id(),
            "replica": replica,
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],  # Ray's ids of the GPUs reserved for it
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }
        self._model, self._done, self._samples_done = spec.model.name, 0, 0
        self._error: str | None = None
        try:
            _check_gpus(spec, self._where)
            self._worker: Worker | None = Worker(spec)
        except Exception as e:  # noqa: BLE001 - reported by ready(), so the driver fails in one line
            self._worker, self._error = None, _one_line(e)

    def __repr__(self) -> str:  # the Ray dashboard's Actors page shows it: where the run is
        state = "failed to load" if self._error else f"{self._done} partitions, {self._samples_done} samples done"
        return f"tokmarg {self._model} replica {self._where['replica']}: {state}"

    def ready(self) -> dict:
        if self._worker is None:
            return {**self._where, "error": self._error}
        return {**self._where, **self._worker.describe()}

    def run_partition(self, part: Partition) -> PartitionResult:
        if self._worker is None:
            raise RuntimeError(self._error)
        t0 = time.perf_counter()
        res = self._worker.run_partition(part)
        self._samples.inc(len(part.samples))
        self._tokens.inc(res.meta.tokens_forwarded)
        self._latency.observe(time.perf_counter() - t0)
        self._done += 1
        self._samples_done += len(part.samples)
        res.meta.worker.update(self._where)
        return res


def _check_gpus(spec: WorkerSpec, where: dict) -> None:
    """An actor given GPUs that sees no CUDA device would load the model on its CPU with
    ``--device auto``: stop instead, naming the actor and node."""
    if not where["gpu_ids"] or spec.model.device != "auto":
        return
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(
            f"actor {where['actor']} on node {where['node_id'][:12]} was given GPU(s) {', '.join(where['gpu_ids'])} "
            f"(CUDA_VISIBLE_DEVICES={where['cuda_visible_devices']}) but torch sees no CUDA device there; "
            "install a CUDA build of torch on that node, or pass --device cpu"
        )


def fits(capacity: Sequence[float], need: float) -> int:
    """How many actors needing ``need`` of a resource fit on nodes with these capacities."""
    return sum(int(c // need + 1e-9) for c in capacity) if need > 0 else 10**9


def fair_share(node_cpus: Sequence[float], n_actors: int) -> float:
    """The most whole CPUs per actor such that all ``n_actors`` fit at once (at least 1)."""
    for c in range(int(max(node_cpus, default=1)), 1, -1):
        if fits(node_cpus, c) >= n_actors:
            return float(c)
    return 1.0


def slots(nodes: Sequence[dict], gpus: float, cpus: float) -> int:
    """How many actors of ``gpus`` GPUs and ``cpus`` CPUs the ``nodes`` hold at once."""
    total = 0
    for n in nodes:
        res = n["Resources"]
        total += min(fits([res.get("GPU", 0.0)], gpus), fits([res.get("CPU", 0.0)], cpus))
    return total


def _nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


class RayLauncher:
    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        replicas: int = 1,
        gpus_per_actor: float | None = None,
        cpus_per_actor: float | None = None,
        max_restarts: int = 3,
        dashboard_host: str = "127.0.0.1",
        log: object = None,
    ) -> None:
        if replicas < 1:
            raise RunError(f"--replicas {replicas}: must be >= 1")
        self.address = address
        self.auth_mode = match_cluster_auth(address)  # before the first `import ray`
        self.replicas = replicas
        self.gpus_per_actor = gpus_per_actor
        self.cpus_per_actor = cpus_per_actor
        self.max_restarts = max_restarts
        self.dashboard_host = dashboard_host
        self.log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))  # above the progress bars
        self.namespace = f"tokmarg-{uuid.uuid4().hex[:8]}"
        self.actors: dict[str, list] = {}  # model -> handles (index = replica)
        self.described: dict[str, dict] = {}  # actor name -> ready() info
        self.pids: dict[str, set[int]] = {}  # actor name -> pids seen (a restart shows a new pid)
        self.resources: dict = {}
        self.slots = 0  # actors the nodes hold at once (set by start)
        self.specs: list[WorkerSpec] = []
        self.waves: list[dict] = []  # the models in the order they ran (Waves fills it)
        self.started_local = False
        self.connected = False  # this launcher called ray.init (so close() disconnects)
        self.dashboard_url = ""

    # ----------------------------------------------------------------------------- start
    def _init(self) -> None:
        import ray

        try:
            if self.address is None:
                ctx = ray.init(
                    address="local",
                    namespace=self.namespace,
                    include_dashboard=True,
                    dashboard_host=self.dashboard_host,
                    logging_level="warning",
                )
                self.started_local = True
            else:
                ctx = ray.init(address=self.address, namespace=self.namespace, logging_level="warning")
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"--address {self.address}" if self.address else "local Ray"
            raise RunError(f"{where}: cannot start or join a Ray cluster ({_one_line(e)})") from None
        self.connected = True
        url = getattr(ctx, "dashboard_url", "") or ""
        self.dashboard_url = f"http://{url}" if url and not url.startswith("http") else url
        where = "local Ray instance" if self.started_local else f"Ray cluster at {self.address}"
        token = " (log in with the token `ray get-auth-token` prints)" if self.dashboard_url else ""
        self.log(f"{where}; dashboard: {self.dashboard_url or 'not running'}{token}; namespace {self.namespace}")

    def _resources(self, n_actors: int) -> tuple[float, float]:
        """(GPUs, CPUs) per actor, and how many actors the nodes hold at once (``self.slots``)."""
        nodes = _nodes()
        node_gpus = [n["Resources"].get("GPU", 0.0) for n in nodes]
        node_cpus = [n["Resources"].get("CPU", 0.0) for n in nodes]
        gpus = self.gpus_per_actor if self.gpus_per_actor is not None else (1.0 if max(node_gpus, default=0) else 0.0)
        cpus = (
            self.cpus_per_actor
            if self.cpus_per_actor is not None
            else (1.0 if gpus else fair_share(node_cpus, n_actors))
        )
        self.slots = slots(nodes, gpus, cpus)
        if self.slots == 0:
            biggest = ", ".join(
                f"{n['Resources'].get('GPU', 0):g} GPU + {n['Resources'].get('CPU', 0):g} CPU" for n in nodes
            )
            msg = f"an actor needs {gpus:g} GPU + {cpus:g} CPU and no node has that (nodes: {biggest or 'none'})"
            if self.started_local:
                raise RunError(msg + "; lower --gpus-per-actor or --cpus-per-actor")
            self.log(f"warning: {msg}; the actors wait until the cluster grows")
        elif self.slots < n_actors:
            self.log(f"{n_actors} actors, {self.slots} at a time: models run in waves, the next as one finishes")
        self.resources = {"gpus_per_actor": gpus, "cpus_per_actor": cpus, "nodes": len(nodes), "slots": self.slots}
        return gpus, cpus

    def start(self, specs: Sequence[WorkerSpec]) -> None:
        """Join or start Ray and size the actors; they are created in :meth:`run`, as many at a
        time as the nodes hold."""
        import ray

        self._init()
        gpus, cpus = self._resources(len(specs) * self.replicas)
        self._cls = ray.remote(RayWorker)
        self._options = {"num_cpus": cpus, "num_gpus": gpus}
        # torch threads = its CPUs; a model over several GPUs when an actor has them
        self.specs = [replace(spec, threads=max(1, int(cpus)), spread=gpus > 1) for spec in specs]

    def _create(self, spec: WorkerSpec) -> list:
        handles = []
        for r in range(self.replicas):
            handles.append(
                self._cls.options(
                    name=f"tokmarg/{spec.model.name}/{r}",
                    max_restarts=self.max_restarts,
                    max_task_retries=self.max_restarts,
                    **self._options,
                ).remote(spec, r)
            )
        self.actors[spec.model.name] = handles
        return handles

    # ----------------------------------------------------------------------------- run
    def run(self, work: Sequence[tuple[str, Partition]], on_result: OnResult, on_state: OnState | None = None) -> None:
        """Score ``work``: models in order, as many actors at a time as fit; a model's actors are
        released once its last partition is written, and the next model's are created."""
        Waves(self, work, on_result, on_state or (lambda _m, _s: None)).run()

    # ----------------------------------------------------------------------------- report
    def info(self) -> dict:
        actors = []
        restarts = self._restarts()
        for name, d in self.described.items():
            actors.append({**d, "pids_seen": sorted(self.pids.get(name, ())), "num_restarts": restarts.get(name)})
        return {
            "launcher": self.name,
            "address": self.address or "local",
            "dashboard": self.dashboard_url,
            "namespace": self.namespace,
            "replicas": self.replicas,
            "max_restarts": self.max_restarts,
            "auth_mode": os.environ.get(AUTH_ENV, "ray default"),  # as this driver connected
            **self.resources,
            "waves": self.waves,
            "workers": actors,  # one entry per actor (the local launcher: per model it loaded)
        }

    def _restarts(self) -> dict[str, int]:
        """Restarts per actor from Ray's state API (or from the pids the driver saw)."""
        out = {name: max(0, len(p) - 1) for name, p in self.pids.items()}
        try:
            from ray.util.state import list_actors

            mine = [("ray_namespace", "=", self.namespace)]
            for a in list_actors(filters=mine, detail=True, raise_on_missing_output=False):
                if a.name in out:
                    out[a.name] = max(out[a.name], int(getattr(a, "num_restarts", 0) or 0))
        except Exception:  # noqa: BLE001 - the state API needs the dashboard; the pid count stands in
            pass
        return out

    def close(self) -> None:
        """Disconnect: the actors belong to this driver's job, so Ray ends them with it (a local
        instance started for the run stops altogether)."""
        import ray

        if self.connected and ray.is_initialized():
            ray.shutdown()
            self.connected = False


def task_error(name: str, part: Partition, e: BaseException) -> BaseException:
    """An exception raised inside a partition: our own one-line errors pass through as they are."""
    from tokmarg.engine import EngineError
    from tokmarg.models import ModelError
    from tokmarg.prompts import PromptError

    cause = getattr(e, "cause", None)
    if isinstance(cause, (EngineError, ModelError, PromptError)):
        return cause
    if cause is not None and "out of memory" in str(cause).lower():
        return MemoryError(f"{name}: out of memory on partition {part.index}")
    text = _one_line(cause) if cause is not None else _one_line(e)
    return RunError(f"{name} failed on partition {part.index}: {type(cause or e).__name__}: {text}")
