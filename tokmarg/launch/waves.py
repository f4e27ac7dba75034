"""The Ray launcher's scheduling loop: models in waves, partitions to whichever replica is ready.

One pass of :meth:`Waves.run` over a run's work:

* **Waves.** A model's actors are created when ours leave room for them (``launcher.slots``,
  or at once when none of ours is alive: a cluster that must grow first still makes
  progress); models start in the order given. A model's actors are killed once its last
  partition is written, and the next model's are created.
* **Ready replicas only.** A replica still loading, or waiting for resources, holds no work:
  partitions go to ready replicas, at most ``IN_FLIGHT_PER_ACTOR`` each. The one wait: no
  partition is sent before each model of the first wave has a replica ready (or
  ``GATE_S`` after the first one is), so that a model that cannot load fails the run before
  anything is written.
* **Failures.** A model that fails to load fails the run at once, in one line. An actor that
  dies is restarted by Ray (``max_restarts``; the call in flight is retried); one gone for
  good leaves its partitions to the model's other replicas. A node that dies takes its
  actors' calls with it: they go back to the queue for the replicas left, and the actors are
  awaited again (Ray restarts them where there is room). If no node left can hold an actor,
  the run stops in one line after ``LOST_GRACE_S``; finished partitions are kept.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tokmarg.launch import OnResult, OnState
from tokmarg.rundir import RunError
from tokmarg.worker import Partition

if TYPE_CHECKING:
    from tokmarg.launch.cluster import RayLauncher

IN_FLIGHT_PER_ACTOR = 2  # one running, one queued behind it: no idle gap between partitions
MAX_ATTEMPTS = 5  # failed attempts at one partition (beyond Ray's own retries) before the run gives up
GATE_S = 120.0  # the longest the first wave's loaded models wait for its other models to load
LOST_GRACE_S = 20.0  # how long no node may be able to hold an actor before the run stops
RELEASE_WAIT_S = 3.0  # how long a finished model's last loading replicas may take to report
NODE_CHECK_S = 2.0  # how often the loop looks for dead nodes
WAIT_LOG_S = 30.0  # how often it says what it waits for

Key = tuple[str, int]  # (model, replica)


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class Waves:
    def __init__(
        self, launcher: RayLauncher, work: Sequence[tuple[str, Partition]], on_result: OnResult, on_state: OnState
    ) -> None:
        self.l, self.on_result, self.on_state = launcher, on_result, on_state
        models = [s.model.name for s in launcher.specs]
        self.specs = {s.model.name: s for s in launcher.specs}
        self.queues = {m: deque(p for mm, p in work if mm == m) for m in models}
        self.todo = {m: {p.index for p in q} for m, q in self.queues.items()}  # partitions not yet written
        self.waiting = deque(m for m in models if self.todo[m])  # models whose actors are not created yet
        self.alive: set[Key] = set()  # created, not gone for good
        self.ready: dict[Key, str] = {}  # ready replicas -> their node id
        self.readying: dict = {}  # ready() ref -> key
        self.inflight: dict = {}  # run_partition ref -> (model, replica, partition)
        self.load: dict[Key, int] = {}
        self.attempts: dict[tuple[str, int], int] = {}
        self.order: list[dict] = launcher.waves  # what the manifest shows: models in the order they ran
        self.gate: set[str] = set()  # first-wave models without a ready replica yet
        self.gate_since: float | None = None  # when the first replica was ready
        self.no_room_since: float | None = None
        self.last_node_check = self.last_log = time.monotonic()

    # ------------------------------------------------------------------ actors
    def _start_models(self) -> None:
        first = not self.order
        while self.waiting and (len(self.alive) < max(self.l.slots, 1) or not self.alive):
            m = self.waiting.popleft()
            handles = self.l._create(self.specs[m])
            for r, h in enumerate(handles):
                key = (m, r)
                self.alive.add(key)
                self.load[key] = 0
                self.readying[h.ready.remote()] = key
            self.order.append({"model": m, "order": len(self.order) + 1, "created": _now(), "replicas": len(handles)})
            self.on_state(m, "loading")
            if first:
                self.gate.add(m)

    def _release(self, m: str) -> None:
        """Its last partition is written: free its actors' resources for the next model."""
        import ray

        late = [ref for ref, k in self.readying.items() if k[0] == m]
        if late:  # replicas about to be ready: a moment, so that the manifest says where they ran
            for ref in ray.wait(late, num_returns=len(late), timeout=RELEASE_WAIT_S)[0]:
                key = self.readying.pop(ref)
                try:
                    self._record(key, ray.get(ref))
                except Exception:  # noqa: BLE001 - it did not start: nothing to record
                    pass
        for r, h in enumerate(self.l.actors.get(m, [])):
            key = (m, r)
            name = f"tokmarg/{m}/{r}"
            # a replica still loading or waiting for resources when the others finished the work
            self.l.described.setdefault(name, {"actor": name, "model": m, "replica": r, "ready": False})
            self.alive.discard(key)
            self.ready.pop(key, None)
            try:
                ray.kill(h, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.readying = {ref: k for ref, k in self.readying.items() if k[0] != m}
        for ref in [ref for ref, (mm, _, _) in self.inflight.items() if mm == m]:  # late copies of retried calls
            del self.inflight[ref]
            _cancel(ref)
        self._entry(m)["finished"] = _now()
        self.on_state(m, "done")

    def _entry(self, m: str) -> dict:
        return next(e for e in reversed(self.order) if e["model"] == m)

    def _record(self, key: Key, info: dict) -> None:
        """What the manifest says of a replica that became ready."""
        name = f"tokmarg/{key[0]}/{key[1]}"
        self.l.described[name] = {**info, "ready": True}
        self.l.pids.setdefault(name, set()).add(info["pid"])

    def _on_ready(self, ref: object, key: Key) -> None:
        import ray

        m, r = key
        name = f"tokmarg/{m}/{r}"
        try:
            info = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            if not self.todo[m]:
                return
            raise RunError(f"actor {name} could not start ({one_line(e)})") from None
        if info.get("error"):
            from tokmarg.models import ModelError

            raise ModelError(info["error"])
        self._record(key, info)
        self.gate.discard(m)
        self.gate_since = self.gate_since or time.monotonic()
        if key in self.alive:
            self.ready[key] = info["node_id"]
            entry = self._entry(m)
            if "ready" not in entry:
                entry["ready"] = _now()
                self.on_state(m, "running")

    # ------------------------------------------------------------------ partitions
    def _feed(self) -> None:
        if self.gate and (self.gate_since is None or time.monotonic() - self.gate_since < GATE_S):
            return
        for key in sorted(self.ready):
            m, r = key
            while self.load[key] < IN_FLIGHT_PER_ACTOR and self.queues[m]:
                part = self.queues[m].popleft()
                self.inflight[self.l.actors[m][r].run_partition.remote(part)] = (m, r, part)
                self.load[key] += 1

    def _retry(self, m: str, part: Partition, why: BaseException | str) -> int:
        n = self.attempts[(m, part.index)] = self.attempts.get((m, part.index), 0) + 1
        if n > MAX_ATTEMPTS:
            text = why if isinstance(why, str) else f"{type(why).__name__}: {one_line(why)}"
            raise RunError(f"model {m!r}, partition {part.index}: failed {n} times (last: {text})") from None
        if part.index in self.todo[m] and all(p.index != part.index for p in self.queues[m]):
            self.queues[m].appendleft(part)
        return n

    def _on_result(self, ref: object, m: str, r: int, part: Partition) -> None:
        import ray

        from tokmarg.launch.cluster import task_error

        self.load[(m, r)] -= 1
        name = f"tokmarg/{m}/{r}"
        if not self.todo[m]:  # a late copy of a partition of a finished model (its actors are gone)
            return
        try:
            res = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            raise task_error(name, part, e) from None
        except ray.exceptions.ActorDiedError as e:  # restarts used up: the other replicas take over
            self.alive.discard((m, r))
            self.ready.pop((m, r), None)
            self.l.log(f"warning: actor {name} is gone after {self.l.max_restarts} restart(s): {one_line(e)}")
            if not any(k[0] == m for k in self.alive):
                raise RunError(f"model {m!r}: every actor died (last: {one_line(e)})") from None
            self._retry(m, part, e)
        except ray.exceptions.RayError as e:  # unavailable while restarting, a lost result, a node gone
            # back off (2, 4, ... 30 s) so that a restarting actor is back before it gets the partition again
            time.sleep(min(30.0, 2.0 ** self._retry(m, part, e)))
        else:
            self.l.pids.setdefault(name, set()).add(res.meta.worker["pid"])
            if part.index in self.todo[m]:
                self.todo[m].discard(part.index)
                self.on_result(res)
                if not self.todo[m]:
                    self._release(m)

    # ------------------------------------------------------------------ nodes
    def _check_nodes(self) -> None:
        """Calls on a dead node's actors go back to the queue; their actors are awaited again."""
        from tokmarg.launch.cluster import _nodes, slots

        self.last_node_check = time.monotonic()
        nodes = _nodes()
        up = {n["NodeID"] for n in nodes}
        lost = [key for key, node in self.ready.items() if node not in up]
        for key in lost:
            m, r = key
            del self.ready[key]
            self.l.log(f"warning: the node of actor tokmarg/{m}/{r} is gone; its partitions go to the replicas left")
            for ref, (mm, rr, part) in list(self.inflight.items()):
                if (mm, rr) == key:
                    del self.inflight[ref]
                    _cancel(ref)
                    self._retry(m, part, "its node died")
            self.load[key] = 0
            self.readying[self.l.actors[m][r].ready.remote()] = key  # back when Ray restarts it
        if self.ready or self.inflight:
            self.no_room_since = None
            return
        opts = self.l._options
        if slots(nodes, opts["num_gpus"], opts["num_cpus"]) > 0:
            self.no_room_since = None
        elif self.no_room_since is None:
            self.no_room_since = time.monotonic()
        elif time.monotonic() - self.no_room_since > LOST_GRACE_S:
            need = f"{opts['num_gpus']:g} GPU + {opts['num_cpus']:g} CPU"
            models = ", ".join(m for m in self.todo if self.todo[m])
            raise RunError(f"no node left can hold an actor ({need}) for {models}: the cluster lost nodes")

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        import ray

        self._start_models()
        while any(self.todo.values()):
            self._feed()
            refs = [*self.inflight, *self.readying]
            if refs:
                done = ray.wait(refs, num_returns=1, timeout=NODE_CHECK_S)[0]
            else:  # nothing to wait on (every actor of ours gone): only _check_nodes can end this
                done = []
                time.sleep(NODE_CHECK_S)
            for ref in done:
                if ref in self.readying:
                    self._on_ready(ref, self.readying.pop(ref))
                elif ref in self.inflight:
                    self._on_result(ref, *self.inflight.pop(ref))
            self._start_models()
            now = time.monotonic()
            if not done or now - self.last_node_check > NODE_CHECK_S:
                self._check_nodes()
            if not done and now - self.last_log > WAIT_LOG_S:
                self.last_log = now
                waiting = sorted(f"tokmarg/{m}/{r}" for m, r in self.readying.values())
                if waiting and not self.inflight:
                    self.l.log(f"waiting for {', '.join(waiting)}: loading, or waiting for cluster resources")


def _cancel(ref: object) -> None:
    import ray

    try:
        ray.cancel(ref)
    except Exception:  # noqa: BLE001 - a call that cannot be cancelled runs out and is ignored
        pass


def _now() -> str:
    from tokmarg.rundir import now

    return now()
