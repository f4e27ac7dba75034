"""Progress of a run, per model, in samples (see :class:`Progress`)."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from tokmarg.config import Config
from tokmarg.data import Dataset


class Progress:
    """Per model, in samples: tqdm bars on a terminal; elsewhere (``ray job logs``, a file) a
    plain line per model at most every ``LINE_EVERY_S`` seconds, not a wall of redraws. A
    model's state (waiting, loading, running, done) shows beside its bar, so the bars tell the
    order in which models ran."""

    LINE_EVERY_S = 15.0

    def __init__(
        self, cfg: Config, ds: Dataset, done: dict[str, set[int]], sizes: dict[int, int], enabled: bool
    ) -> None:
        self.total = len(ds)
        self.count = {m.name: sum(sizes[i] for i in done[m.name]) for m in cfg.models}
        self.tty = enabled and sys.stderr.isatty()
        self.enabled = enabled
        self.t0, self.last = time.monotonic(), dict.fromkeys(self.count, 0.0)
        self.bars = {
            mc.name: tqdm(
                total=self.total,
                initial=self.count[mc.name],
                desc=mc.name[-40:].ljust(40),
                unit="sample",
                position=i,
                leave=True,
                file=sys.stderr,
                mininterval=0.5,
                postfix="waiting",
            )
            for i, mc in enumerate(cfg.models)
        } if self.tty else {}  # fmt: skip

    def advance(self, model: str, n: int) -> None:
        self.count[model] += n
        done = self.count[model]
        if model in self.bars:
            self.bars[model].update(n)
        elif self.enabled and (time.monotonic() - self.last[model] > self.LINE_EVERY_S or done == self.total):
            self.last[model] = time.monotonic()
            self._line(f"{model}: {done}/{self.total} samples ({100 * done / self.total:.0f}%)")

    def state(self, model: str, state: str) -> None:
        if model in self.bars:
            self.bars[model].set_postfix_str(state)
        elif self.enabled:
            self._line(f"{model}: {state}")

    def _line(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f} s] {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        for b in self.bars.values():
            b.close()
