"""The in-process launcher (``tokmarg eval --no-ray``): one model at a time, partitions in order."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import replace

from tokmarg.launch import OnResult, OnState
from tokmarg.worker import Partition, Worker, WorkerSpec


class LocalLauncher:
    name = "local"

    def __init__(self, threads: int = 0) -> None:
        self.threads = threads
        self.specs: dict[str, WorkerSpec] = {}
        self.workers: list[dict] = []

    def start(self, specs: Sequence[WorkerSpec]) -> None:
        # models load one at a time in run(), so that only one is resident
        self.specs = {s.model.name: s for s in specs}

    def run(self, work: Sequence[tuple[str, Partition]], on_result: OnResult, on_state: OnState | None = None) -> None:
        state = on_state or (lambda _m, _s: None)
        for model, spec in self.specs.items():
            parts = [p for m, p in work if m == model]
            if not parts:
                continue
            if self.threads:
                spec = replace(spec, threads=self.threads)
            state(model, "loading")
            worker = Worker(spec)
            self.workers.append(worker.describe())
            state(model, "running")
            for part in parts:
                on_result(worker.run_partition(part))
            state(model, "done")
            del worker
            gc.collect()

    def info(self) -> dict:
        return {"launcher": self.name, "workers": self.workers}

    def close(self) -> None:
        pass
