"""A run's θ on disk: ``theta.npz`` with one array ``theta`` (written by ``task=train``,
read by ``task=evaluate`` and by a training run that starts from it)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from framework.experiment.config import ConfigError

THETA_FILE = "theta.npz"


def write_theta(path: Path, theta: np.ndarray) -> None:
    np.savez(path, theta=theta)


def read_theta(key: str, path: str | Path, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The θ in ``path`` as float64; a ``ConfigError`` naming ``key`` when the file cannot be
    read, holds no finite float array ``theta``, or (given ``shape``) one of another shape."""
    where = Path(path).expanduser()
    try:
        with np.load(where, allow_pickle=False) as data:
            theta = np.asarray(data["theta"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
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
