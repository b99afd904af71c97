"""Shared fixtures: the numerical core is tested on every (namespace, device) pair."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock
from threadpoolctl import threadpool_limits

from backends import Backend, BackendUnavailableError, get_backend

# One BLAS thread per test process (pytest-xdist runs one process per core), as a run
# gets by default; HYPERKRYLOV_TEST_THREADS=2 runs the suite with two.
TEST_THREADS = int(os.environ.get("HYPERKRYLOV_TEST_THREADS", "1"))
threadpool_limits(limits=TEST_THREADS)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests marked ``slow`` first, the order otherwise kept: pytest-xdist then hands
    out the long ones while many short ones remain to even out the workers' ends (by name
    the outage test, among the longest, would come last and run alone)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


# (backend name, device) pairs every core test runs on.  array-api-strict's "device1" is
# a fake second device: mixing it with default-device arrays raises, so leaks show.
BACKEND_CASES = [
    ("numpy", None),
    ("array_api_strict", "CPU_DEVICE"),
    ("array_api_strict", "device1"),
]


def _case_id(case: tuple[str, str | None]) -> str:
    name, device = case
    return name if device is None else f"{name}-{device}"


@pytest.fixture(params=BACKEND_CASES, ids=_case_id)
def backend(request: pytest.FixtureRequest) -> Backend:
    """A float64 backend for each (namespace, device) case."""
    name, device = request.param
    try:
        return get_backend(name, dtype="float64", device=device)
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def cupy_backend() -> Backend:
    """CuPy on the first GPU; skips with the reason when CuPy or a GPU is missing."""
    try:
        return get_backend("cupy", dtype="float64")
    except BackendUnavailableError as exc:
        pytest.skip(f"CuPy backend unavailable: {exc}")


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (MNIST, BSDS300); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"full datasets not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def made_once(tmp_path_factory: pytest.TempPathFactory,
              worker_id: str) -> Callable[[str, Callable[[Path], None]], Path]:
    """``made_once(name, make)``: the folder ``name``, made by ``make(folder)`` once for all
    xdist workers (the first to ask makes it, the others wait for it)."""
    shared = tmp_path_factory.getbasetemp()
    shared = shared if worker_id == "master" else shared.parent

    def folder(name: str, make: Callable[[Path], None]) -> Path:
        with FileLock(shared / f"{name}.lock"):
            if not (shared / f"{name}.done").is_file():
                shutil.rmtree(shared / name, ignore_errors=True)
                (shared / name).mkdir()
                make(shared / name)
                (shared / f"{name}.done").write_text("")
        return shared / name

    return folder


@pytest.fixture(scope="session")
def empty_store(made_once: Callable[[str, Callable[[Path], None]], Path]) -> Path:
    """A SQLite MLflow store with its schema made and no runs, made once for all xdist
    workers: a copy of it costs no schema migrations (seconds for each new store)."""
    def make(folder: Path) -> None:
        from mlflow.tracking import MlflowClient

        MlflowClient(f"sqlite:///{folder}/mlflow.db").search_experiments(max_results=1)

    return made_once("empty-store", make) / "mlflow.db"


@pytest.fixture
def no_store_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The URI of a SQLite MLflow store not made yet, set as MLFLOW_TRACKING_URI (for
    tests of whether and how a store is created)."""
    value = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", value)
    return value


@pytest.fixture
def uri(no_store_uri: str, tmp_path: Path, empty_store: Path) -> str:
    """A new SQLite MLflow store for the test (a copy of ``empty_store``), set as
    MLFLOW_TRACKING_URI."""
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    return no_store_uri
