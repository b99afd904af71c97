from pathlib import Path

import numpy as np
import pytest
from array_api_compat import device as device_of

from backends import BackendUnavailableError, available_backends, get_backend


def test_numpy_backend_roundtrip():
    be = get_backend("numpy", dtype="float32")
    a = be.asarray([1.0, 2.0])
    assert a.dtype == np.float32
    np.testing.assert_array_equal(be.to_numpy(a), [1.0, 2.0])


@pytest.mark.parametrize("device", ["CPU_DEVICE", "device1"])
def test_strict_backend_keeps_device(device):
    be = get_backend("array_api_strict", device=device)
    a = be.asarray(np.arange(3.0))
    assert device_of(a) == be.device
    assert a.dtype == be.dtype
    np.testing.assert_array_equal(be.to_numpy(a), [0.0, 1.0, 2.0])


def test_available_backends_lists_numpy():
    assert "numpy" in available_backends()
    assert "array_api_strict" in available_backends()


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown backend 'jax'.*numpy"):
        get_backend("jax")


def test_bad_dtype_and_device():
    with pytest.raises(ValueError, match="dtype"):
        get_backend("numpy", dtype="int8")
    with pytest.raises(ValueError, match="device"):
        get_backend("numpy", device="cuda")


def test_cupy_unavailable_says_why():
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailableError, match="cupy.*pip install"):
            get_backend("cupy")
    else:
        pytest.skip("CuPy is installed; the error path is for machines without it")


def test_mlflow_folder_does_not_shadow_the_package():
    import mlflow

    root = Path(__file__).resolve().parents[1]
    assert not (root / "mlflow" / "__init__.py").exists()
    assert not (root / "mlflow.py").exists()
    assert "site-packages" in str(Path(mlflow.__file__).resolve())
