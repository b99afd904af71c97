"""A run's θ on disk: ``theta.npz`` with one array ``theta`` (written by ``task=train``,
read by ``task=evaluate`` and by a training run that starts from it).  Where a θ is read, a
training run's ``checkpoint.npz`` serves too: its θ after the checkpoint's step (a running or
stopped run's latest θ)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from framework.experiment import checkpoint
from framework.experiment.config import ConfigError
from framework.experiment.console import say

THETA_FILE = "theta.npz"


def write_theta(path: Path, theta: np.ndarray) -> None:
    np.savez(path, theta=theta)


def read_theta(key: str, path: str | Path, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The θ in ``path`` (a ``theta.npz`` or a training checkpoint) as float64; a
    ``ConfigError`` naming ``key`` when the file cannot be read, holds no finite float array
    ``theta``, or (given ``shape``) one of another shape."""
    where = Path(path).expanduser()
    try:
        with np.load(where, allow_pickle=False) as data:
            saved = data.files
            theta = np.asarray(data["theta"]) if "theta" in saved else None
        if theta is None and checkpoint.STATE_MEMBER in saved:
            state = checkpoint.load(where)
            if "theta" not in state:
                raise ValueError("a checkpoint without θ, not a training run's")
            theta = np.asarray(state["theta"])
            say(f"{key}: θ after step {state.get('step')} of the checkpoint {str(path)!r}")
        elif theta is None:
            raise ValueError(f"no array 'theta' among {saved}")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile,
            checkpoint.CheckpointError) as exc:
        raise ConfigError(f"{key}: cannot read θ from {str(path)!r} ({exc})") from exc
    if theta.dtype.kind not in "fiu" or not np.all(np.isfinite(theta)):
        raise ConfigError(f"{key}: {str(path)!r} holds no finite real θ")
    if shape is not None and theta.shape != tuple(shape):
        raise ConfigError(
            f"{key}: {str(path)!r} holds θ of shape {theta.shape}, but this problem's θ has "
            f"shape {tuple(shape)}; give a θ written by a run of the same problem "
            "(the same regulariser, filters and learned parts)"
        )
    return theta.astype(np.float64)
