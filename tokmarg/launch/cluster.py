"""The Ray launcher: one actor per (model, replica), partitions pulled as actors free up.

The worker stays Ray-free; :class:`RayWorker` wraps it at launch with what only Ray needs
(its node, custom metrics), and ``ray.remote(...)`` is applied here, with the resources and
the restart policy of this run. Actors are named ``tokmarg/<model>/<replica>`` in a
namespace of their own, so two runs on one cluster never collide.

No lost work: an actor that dies is restarted (``max_restarts``) and the call in flight is
retried (``max_task_retries``); a partition whose actor is gone for good goes back to the
queue for the model's other replicas. Results come back to the driver, which alone writes
them (once: see :meth:`tokmarg.rundir.RunDir.write_partition`).
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import replace

from tokmarg.launch import OnResult
from tokmarg.rundir import RunError
from tokmarg.worker import Partition, PartitionResult, Worker, WorkerSpec

IN_FLIGHT_PER_ACTOR = 2  # one running, one queued behind it: no idle gap between partitions
MAX_ATTEMPTS = 5  # failed attempts at one partition (beyond Ray's own retries) before the run gives up
LATENCY_BOUNDS = [0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800]


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class RayWorker:
    """The Ray actor: a :class:`Worker` plus its node and custom metrics."""

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
        self._where = {"actor": ctx.get_actor_name(), "node_id": ctx.get_node_id(), "replica": replica}
        self._error: str | None = None
        try:
            self._worker: Worker | None = Worker(spec)
        except Exception as e:  # noqa: BLE001 - reported by ready(), so the driver fails in one line
            self._worker, self._error = None, _one_line(e)

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
        self._tokens.inc(res.tokens)
        self._latency.observe(time.perf_counter() - t0)
        res.worker.update(self._where)
        return res


def _token_auth_for(address: str | None) -> None:
    """Ray 2.60 sends its auth token to an explicit address only with RAY_AUTH_MODE=token set
    before ``import ray``; set it when the user has a token and has not chosen a mode."""
    if address in (None, "auto") or "RAY_AUTH_MODE" in os.environ:
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(path):
        os.environ["RAY_AUTH_MODE"] = "token"


def fits(capacity: Sequence[float], need: float) -> int:
    """How many actors needing ``need`` of a resource fit on nodes with these capacities."""
    return sum(int(c // need + 1e-9) for c in capacity) if need > 0 else 10**9


def fair_share(node_cpus: Sequence[float], n_actors: int) -> float:
    """The most whole CPUs per actor such that all ``n_actors`` fit at once (at least 1)."""
    for c in range(int(max(node_cpus, default=1)), 1, -1):
        if fits(node_cpus, c) >= n_actors:
            return float(c)
    return 1.0


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
        _token_auth_for(address)  # before the first `import ray`
        self.replicas = replicas
        self.gpus_per_actor = gpus_per_actor
        self.cpus_per_actor = cpus_per_actor
        self.max_restarts = max_restarts
        self.dashboard_host = dashboard_host
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.namespace = f"tokmarg-{uuid.uuid4().hex[:8]}"
        self.actors: dict[str, list] = {}  # model -> handles (index = replica)
        self.described: dict[str, dict] = {}  # actor name -> ready() info
        self.pids: dict[str, set[int]] = {}  # actor name -> pids seen (a restart shows a new pid)
        self.resources: dict = {}
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
        """(GPUs, CPUs) per actor such that all ``n_actors`` fit on the nodes at once."""
        nodes = _nodes()
        node_gpus = [n["Resources"].get("GPU", 0.0) for n in nodes]
        node_cpus = [n["Resources"].get("CPU", 0.0) for n in nodes]
        gpus = self.gpus_per_actor if self.gpus_per_actor is not None else (1.0 if max(node_gpus, default=0) else 0.0)
        cpus = (
            self.cpus_per_actor
            if self.cpus_per_actor is not None
            else (1.0 if gpus else fair_share(node_cpus, n_actors))
        )
        short = [
            f"{n_actors} actors x {need:g} {what} do not fit on the nodes' {have} {what}"
            for what, need, have in (("GPU", gpus, node_gpus), ("CPU", cpus, node_cpus))
            if need and fits(have, need) < n_actors
        ]
        if short:
            msg = "; ".join(short) + " (lower --replicas, --gpus-per-actor or --cpus-per-actor)"
            if self.started_local:
                raise RunError(msg)
            self.log(f"warning: {msg}; the actors wait until the cluster grows")
        self.resources = {"gpus_per_actor": gpus, "cpus_per_actor": cpus, "nodes": len(nodes)}
        return gpus, cpus

    def start(self, specs: Sequence[WorkerSpec]) -> None:
        import ray

        self._init()
        gpus, cpus = self._resources(len(specs) * self.replicas)
        cls = ray.remote(RayWorker)
        refs = {}
        for spec in specs:
            spec = replace(spec, threads=max(1, int(cpus)), spread=gpus > 1)  # torch threads = its CPUs
            handles = []
            for r in range(self.replicas):
                name = f"tokmarg/{spec.model.name}/{r}"
                h = cls.options(
                    name=name,
                    num_cpus=cpus,
                    num_gpus=gpus,
                    max_restarts=self.max_restarts,
                    max_task_retries=self.max_restarts,
                ).remote(spec, r)
                handles.append(h)
                refs[h.ready.remote()] = name
            self.actors[spec.model.name] = handles
        self.log(
            f"{len(refs)} actor(s), {gpus:g} GPU and {cpus:g} CPU each: loading "
            + ", ".join(f"{m} x{len(h)}" for m, h in self.actors.items())
        )
        t0 = time.monotonic()
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1, timeout=30)  # a model that fails, fails at once
            if not done:
                self.log(
                    f"waiting for {', '.join(sorted(refs.values()))} ({time.monotonic() - t0:.0f} s): "
                    "loading, or waiting for cluster resources"
                )
                continue
            for ref in done:
                name = refs.pop(ref)
                try:
                    info = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    raise RunError(f"actor {name} could not start ({_one_line(e)})") from None
                if info.get("error"):
                    from tokmarg.models import ModelError

                    raise ModelError(info["error"])
                self.described[name] = info
                self.pids.setdefault(name, set()).add(info["pid"])

    # ----------------------------------------------------------------------------- run
    def run(self, work: Sequence[tuple[str, Partition]], on_result: OnResult) -> None:
        import ray

        queues = {m: deque(p for mm, p in work if mm == m) for m in self.actors}
        alive = {(m, r) for m, hs in self.actors.items() for r in range(len(hs))}
        load = dict.fromkeys(alive, 0)
        inflight: dict = {}  # ref -> (model, replica, partition)
        attempts: dict[tuple[str, int], int] = {}  # (model, partition) -> failed attempts

        def feed(key: tuple[str, int]) -> None:
            m, r = key
            while key in alive and load[key] < IN_FLIGHT_PER_ACTOR and queues[m]:
                part = queues[m].popleft()
                inflight[self.actors[m][r].run_partition.remote(part)] = (m, r, part)
                load[key] += 1

        def retry(m: str, part: Partition, why: BaseException) -> int:
            n = attempts[(m, part.index)] = attempts.get((m, part.index), 0) + 1
            if n > MAX_ATTEMPTS:
                raise RunError(
                    f"model {m!r}, partition {part.index}: failed {n} times (last: {type(why).__name__}: "
                    f"{_one_line(why)}); finished partitions are kept"
                ) from None
            queues[m].appendleft(part)
            return n

        for key in sorted(alive):
            feed(key)
        while inflight:
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=5)
            for ref in done:
                m, r, part = inflight.pop(ref)
                load[(m, r)] -= 1
                name = f"tokmarg/{m}/{r}"
                try:
                    res = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    raise _task_error(name, part, e) from None
                except ray.exceptions.ActorDiedError as e:  # restarts used up: the other replicas take over
                    alive.discard((m, r))
                    self.log(f"warning: actor {name} is gone after {self.max_restarts} restart(s): {_one_line(e)}")
                    if not any(k[0] == m for k in alive):
                        raise RunError(
                            f"model {m!r}: every actor died (last: {_one_line(e)}); finished partitions are kept"
                        ) from None
                    retry(m, part, e)
                except ray.exceptions.RayError as e:  # unavailable while restarting, a lost result, a node gone
                    # back off (2, 4, ... 30 s) so that a restarting actor is back before it gets the partition again
                    time.sleep(min(30.0, 2.0 ** retry(m, part, e)))
                else:
                    self.pids.setdefault(name, set()).add(res.worker["pid"])
                    on_result(res)
                for k in sorted(alive):
                    feed(k)

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
            **self.resources,
            "actors": actors,
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


def _task_error(name: str, part: Partition, e: BaseException) -> BaseException:
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
