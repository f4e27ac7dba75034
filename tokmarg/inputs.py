"""Where `params.yaml` and the dataset come from when the command line names none.

In a checkout (or any directory holding them) ``./params.yaml`` and ``./datasets/sample.jsonl``;
elsewhere (a ``pip install``, ``ray job submit --working-dir`` of another folder) the copies
shipped inside the package (``tokmarg/defaults/``: links to the checkout's files, copied into a
wheel when it is built). The run's manifest records which one a run used.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

PARAMS = Path("params.yaml")
DATASET = Path("datasets/sample.jsonl")
GIVEN, WORKDIR, PACKAGED = "command line", "working directory", "packaged defaults"


def packaged(name: str) -> Path:
    """A file of the package's embedded defaults."""
    return Path(str(resources.files("tokmarg") / "defaults" / name))


def _resolve(given: Path | None, local: Path, shipped: str) -> tuple[Path, str]:
    if given is not None:
        return given, GIVEN
    if local.is_file():
        return local, WORKDIR
    return packaged(shipped), PACKAGED


def params_file(given: Path | None) -> tuple[Path, str]:
    """(path, where it came from) of the params file to use."""
    return _resolve(given, PARAMS, "params.yaml")


def dataset_file(given: Path | None) -> tuple[Path, str]:
    """(path, where it came from) of the dataset to use."""
    return _resolve(given, DATASET, "sample.jsonl")
