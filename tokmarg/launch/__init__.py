"""Launchers run workers on partitions: in this process (``local``) or as Ray actors (``ray``).

Both take the same work list and call ``on_result`` once per finished partition on the
driver, which writes it; the runner does not know which one it talks to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from tokmarg.records import PartitionResult
from tokmarg.settings import LaunchSettings
from tokmarg.worker import Partition, WorkerSpec

OnResult = Callable[[PartitionResult], None]
OnState = Callable[[str, str], None]  # (model, "waiting" | "loading" | "running" | "done")


class Launcher(Protocol):
    name: str

    def start(self, specs: Sequence[WorkerSpec]) -> None:
        """Get ready to run these workers (Ray: join or start the cluster, size the actors)."""

    def run(self, work: Sequence[tuple[str, Partition]], on_result: OnResult, on_state: OnState | None = None) -> None:
        """Score every (model, partition); call ``on_result`` on the driver as each finishes and
        ``on_state`` as a model starts loading, starts scoring and is done."""

    def info(self) -> dict:
        """What the manifest records about the launch (workers, placement, restarts)."""

    def close(self) -> None: ...


def make_launcher(launch: LaunchSettings) -> Launcher:
    """The launcher these settings ask for (Ray is imported only when it is used)."""
    if not launch.ray:
        from tokmarg.launch.local import LocalLauncher

        return LocalLauncher(threads=max(1, int(launch.cpus_per_actor)) if launch.cpus_per_actor else 0)
    from tokmarg.launch.cluster import RayLauncher

    return RayLauncher(
        launch.address,
        replicas=launch.replicas,
        gpus_per_actor=launch.gpus_per_actor,
        cpus_per_actor=launch.cpus_per_actor,
        max_restarts=launch.max_restarts,
        dashboard_host=launch.dashboard_host,
    )
