"""Atomic save and restore of a nested state (run checkpoints, caches) in one ``.npz``.

Format (version 1): the state is dicts (string keys), lists (tuples become lists), NumPy
arrays and JSON scalars.  The archive holds ``__state__.json`` (uint8 UTF-8 JSON of the
structure, each array replaced by ``{"__ndarray__": "<key>"}``) and one member per array
(``a0``, ``a1``, …; no pickling: object arrays are refused).  NumPy scalars become Python
scalars; floats round-trip exactly.  A crash leaves the old or the new file, never a torn one.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
STATE_MEMBER = "__state__.json"  # the archive member that marks a checkpoint
_ARRAY = "__ndarray__"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read."""


def _encode(obj: Any, arrays: dict[str, np.ndarray], where: str) -> Any:
    if isinstance(obj, dict):
        if bad := [key for key in obj if not isinstance(key, str)]:
            raise CheckpointError(f"{where}: dict keys must be strings; got {bad[0]!r}")
        return {key: _encode(value, arrays, f"{where}.{key}") for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise CheckpointError(f"{where}: object arrays cannot be checkpointed")
        arrays[key := f"a{len(arrays)}"] = obj
        return {_ARRAY: key}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise CheckpointError(
        f"{where}: cannot checkpoint a value of type {type(obj).__name__}; "
        "use host NumPy arrays and Python scalars")


def save(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically to ``path`` (a ``.npz`` file); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    text = json.dumps({"format": FORMAT_VERSION, "state": _encode(state, arrays, "state")})
    members = {STATE_MEMBER: np.frombuffer(text.encode("utf-8"), dtype=np.uint8), **arrays}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **members)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # the rename too (not every file system opens folders)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # a killed writer's
        stale.unlink(missing_ok=True)
    return path


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save`` (arrays as NumPy, no pickle)."""
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(bytes(archive[STATE_MEMBER]).decode("utf-8"), object_hook=lambda d: (
                np.array(archive[d[_ARRAY]]) if set(d) == {_ARRAY} else d))
    except Exception as exc:  # NumPy's own message may advise unpickling: not shown
        raise CheckpointError(
            f"{path}: unreadable checkpoint (not an archive this program wrote: "
            f"{type(exc).__name__}); delete it to start afresh (or choose another "
            "hydra.run.dir)") from exc
    if (version := meta.get("format")) != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {version!r}; this version reads "
                              f"format {FORMAT_VERSION}")
    return meta["state"]
