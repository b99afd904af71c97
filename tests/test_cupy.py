"""The numerical core on CuPy (skipped with a reason when CuPy or a GPU is absent)."""

from __future__ import annotations

import numpy as np
import pytest
from array_api_compat import device as device_of

from framework.krylov import rminres
from framework.krylov.recycle import RecycleConfig
from framework.krylov.sequence import solve_sequence
from framework.krylov.stopping import StopConfig
from problems.sequences import drifting_sequence

pytestmark = pytest.mark.gpu


def spd(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (Q * np.logspace(0, 3, n)) @ Q.T


def test_rminres_on_gpu_matches_numpy(cupy_backend):
    be = cupy_backend
    A = spd(300)
    b = np.random.default_rng(1).standard_normal(300)
    Ad = be.asarray(A)
    gpu = rminres(lambda v: Ad @ v, be.asarray(b), rtol=1e-10)
    cpu = rminres(lambda v: A @ v, b, rtol=1e-10)
    assert device_of(gpu.x) == be.device
    assert gpu.iterations == cpu.iterations
    np.testing.assert_allclose(be.to_numpy(gpu.x), cpu.x, rtol=1e-9)


def test_recycled_sequence_on_gpu_matches_numpy(cupy_backend):
    seq = drifting_sequence(side=32, count=5, seed=3)
    cfg = RecycleConfig("harmonic_ritz", 6)
    gpu = solve_sequence(seq.systems(cupy_backend), recycle=cfg, stop=StopConfig(rtol=1e-8))
    cpu = solve_sequence(seq.systems(), recycle=cfg, stop=StopConfig(rtol=1e-8))
    assert [r.iterations for r in gpu.records] == [r.iterations for r in cpu.records]


def test_batched_on_gpu_matches_numpy(cupy_backend):
    be = cupy_backend
    mats = np.stack([spd(80, s) for s in range(4)])
    b = np.random.default_rng(0).standard_normal((4, 80))
    Md = be.asarray(mats)
    gpu = rminres(lambda V: (Md @ V[..., None])[..., 0], be.asarray(b), rtol=1e-9,
                          check_every=8)
    cpu = rminres(lambda V: (mats @ V[..., None])[..., 0], b, rtol=1e-9)
    assert gpu.iterations == cpu.iterations
    np.testing.assert_allclose(be.to_numpy(gpu.x), cpu.x, rtol=1e-8)


def test_gpu_arrays_check_every_eight(cupy_backend):
    from framework.bilevel.engine import default_check_every

    assert default_check_every(cupy_backend.asarray(np.zeros(3))) == 8
