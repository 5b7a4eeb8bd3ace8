"""The per-user record of the compiled packages this user's own runs built: which ``compiled.pt2`` run as they are.

A ``compiled.pt2`` is an AOTInductor package, a shared library: loading it runs its native code in this
process. A saved folder may come from anyone, so ``load_quantized`` runs a folder's ``compiled.pt2`` only
when its sha256 is one that ``save_quantized`` recorded here when it wrote a package compiled by the same
process (or when the caller vouches for it, ``trust_compiled=True``); otherwise it compiles the portable
``model.pt2`` (a graph and tensors, no code) here.

Why a content hash kept by the user, not a flag in ``card.json`` or a path: the card travels with the
folder, so whatever it says is the sender's word; a path stays trusted whatever is later written there.
The hash names the exact bytes this user's process wrote: moving or copying the folder keeps it, and any
other file (tampered with, or built elsewhere and shipped with a matching card) misses it. The store is
a JSON file under the user's cache directory (``$XDG_CACHE_HOME/smi_plugin/trusted_packages.json``, else
``~/.cache/...``; ``SMI_PLUGIN_TRUST_STORE`` names another file), written atomically; a store that is not the
user's own or that others may write is ignored, since whoever can write it could make any package run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path

from smi_plugin.io import atomic_write_text

logger = logging.getLogger(__name__)

TRUST_STORE_ENV = "SMI_PLUGIN_TRUST_STORE"
# Oldest entries go first beyond this: the store stays a few hundred kB however many models are saved.
MAX_ENTRIES = 1000


def trust_store_path() -> Path:
    """The JSON file of trusted package hashes (``SMI_PLUGIN_TRUST_STORE``, else the user's cache directory)."""
    if os.environ.get(TRUST_STORE_ENV):
        return Path(os.environ[TRUST_STORE_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "smi_plugin" / "trusted_packages.json"


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read(path: Path) -> dict[str, dict]:
    try:
        status = path.stat()
    except FileNotFoundError:
        return {}
    if status.st_uid != os.getuid() or status.st_mode & 0o022:
        logger.warning("ignoring the trust store %s: it is not yours alone to write (owner uid %d, mode %o); "
                       "remove it or point %s elsewhere", path, status.st_uid, status.st_mode & 0o777, TRUST_STORE_ENV)
        return {}
    try:
        entries = json.loads(path.read_text()).get("packages", {})
    except (OSError, ValueError, AttributeError):
        logger.warning("ignoring the unreadable trust store %s; it is rewritten at the next save", path)
        return {}
    return entries if isinstance(entries, dict) else {}


def is_trusted(sha256: str) -> bool:
    """Whether this user's own runs built the package with this sha256."""
    return sha256 in _read(trust_store_path())


def record_trusted(sha256: str, location: str | os.PathLike) -> Path:
    """Add a package this process built (its sha256 and where it was saved) to the store; returns the store."""
    path = trust_store_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # two saves at once must not drop each other's entry: the read-modify-write holds a lock file
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = _read(path)
        entries.pop(sha256, None)  # re-inserted last: the newest entries survive the cap
        entries[sha256] = {"saved_to": str(Path(location).resolve()), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        kept = dict(list(entries.items())[-MAX_ENTRIES:])
        atomic_write_text(path, json.dumps({"packages": kept}, indent=1) + "\n")
        os.chmod(path, 0o600)  # the umask may leave it group-writable, which _read refuses
    return path
