"""Connect to a Ray cluster the way it expects: token authentication or none.

Ray reads ``RAY_AUTH_MODE`` once, before ``import ray``, and a driver whose mode differs from the
cluster's fails late and obscurely (its actors "die unexpectedly"; the driver's Ray log says
"Missing authorization header"). So, unless the user set ``RAY_AUTH_MODE``, tokmarg asks the
cluster first: a separate process with authentication off reads one key from the cluster's GCS;
the GCS of a cluster with token auth refuses it. The mode is then set to match, and a cluster
that wants a token this machine does not have (or rejects the one it has) stops the run in one
line, before any work.

A local instance (no ``--address``) is Ray's own default (token auth, a token made if missing).
A Ray Client address (``ray://``) cannot be asked this way: Ray's own rules apply there.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tokmarg.rundir import RunError

ENV = "RAY_AUTH_MODE"
HINT = f"set {ENV}=token or {ENV}=disabled, and `ray get-auth-token` on the head prints the cluster's token"

_PROBE = r"""
import sys
from ray._private.services import canonicalize_bootstrap_address_or_die
from ray._raylet import GcsClient
from ray.exceptions import AuthenticationError
try:
    address = canonicalize_bootstrap_address_or_die(sys.argv[1])
    GcsClient(address=address).internal_kv_get(b"tokmarg-auth-probe", None, timeout=15)
except AuthenticationError:
    sys.exit(3)
except Exception as e:
    print(type(e).__name__ + ": " + (str(e).strip().splitlines() or [""])[0], file=sys.stderr)
    sys.exit(4)
"""


def _probe(address: str, mode: str, timeout: float) -> tuple[int, str]:
    """(exit code, last stderr line) of the probe with ``RAY_AUTH_MODE=mode``: 0 accepted,
    3 refused for authentication, 4 another error."""
    env = {**os.environ, ENV: mode}
    try:
        p = subprocess.run(
            [sys.executable, "-c", _PROBE, address], env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return 4, f"no answer in {timeout:.0f} s"
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    return p.returncode, lines[-1] if lines else ""


def has_token() -> bool:
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or os.path.isfile(path)


def match_cluster_auth(address: str | None, timeout: float = 60.0) -> str | None:
    """Set ``RAY_AUTH_MODE`` for joining ``address`` (call before ``import ray``); returns the
    mode chosen, or None where tokmarg leaves it to the user or to Ray."""
    if ENV in os.environ or address is None or address.startswith("ray://"):
        return None
    where = f"the Ray cluster at {address}"
    code, why = _probe(address, "disabled", timeout)
    if code == 0:
        _set("disabled")
        return "disabled"
    if code != 3:
        raise RunError(f"--address {address}: cannot reach a Ray cluster ({why})")
    if not has_token():
        raise RunError(f"{where} uses token authentication and this machine has no token: {HINT}")
    code, why = _probe(address, "token", timeout)
    if code == 3:
        raise RunError(f"{where} rejects this machine's Ray token: {HINT}")
    if code != 0:
        raise RunError(f"--address {address}: cannot reach a Ray cluster ({why})")
    _set("token")
    return "token"


def _set(mode: str) -> None:
    os.environ[ENV] = mode
    if "ray" in sys.modules:  # already imported (e.g. by a test): Ray's own way to re-read the mode
        from ray._raylet import Config

        Config.initialize("")
