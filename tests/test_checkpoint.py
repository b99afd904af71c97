"""Checkpoints: bit-identical round trip, atomic replacement, clear errors."""

from __future__ import annotations

import json
import signal
import threading

import numpy as np
import pytest

from framework.experiment import checkpoint
from framework.experiment.checkpoint import CheckpointError
from framework.experiment.stop_signals import StepBoundary


def _state():
    rng = np.random.default_rng(7)
    gen = np.random.default_rng(123)
    gen.standard_normal(5)
    return {
        "step": 12,
        "finished": False,
        "run_id": "abc123",
        "theta": rng.standard_normal((8, 26)),
        "optimizer": {"name": "adam", "t": 12, "m": rng.standard_normal(3), "v": None},
        "engine": {
            "samples": [
                {"x": rng.standard_normal(5).astype(np.float32), "U": np.zeros((5, 0))},
                {"x": np.arange(4, dtype=np.int64), "count": np.int64(3)},
            ]
        },
        "rng": gen.bit_generator.state,
        "loss": 0.1 + 0.2,
        "special": [float("nan"), float("inf"), -0.0, 1e-310],
        "tuple": (1, 2),
    }


def test_round_trip_is_bit_identical(tmp_path):
    state = _state()
    path = checkpoint.save(tmp_path / "ck.npz", state)
    back = checkpoint.load(path)
    assert back["step"] == 12 and back["run_id"] == "abc123" and back["finished"] is False
    assert back["theta"].tobytes() == state["theta"].tobytes()
    assert back["engine"]["samples"][0]["x"].dtype == np.float32
    assert back["engine"]["samples"][0]["U"].shape == (5, 0)
    assert back["engine"]["samples"][1]["count"] == 3
    assert back["optimizer"]["v"] is None
    assert back["loss"] == 0.1 + 0.2
    special = back["special"]
    assert np.isnan(special[0]) and special[1] == float("inf") and special[3] == 1e-310
    assert str(special[2]) == "-0.0"
    assert back["tuple"] == [1, 2]
    restored = np.random.default_rng(0)
    restored.bit_generator.state = back["rng"]
    gen = np.random.default_rng(123)
    gen.standard_normal(5)
    np.testing.assert_array_equal(restored.standard_normal(4), gen.standard_normal(4))


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck.npz"
    checkpoint.save(path, {"step": 1, "theta": np.ones(3)})

    real_savez = np.savez

    def crash(fh, **members):
        real_savez(fh, **members)  # the bytes are written ...
        fh.write(b"garbage")
        raise OSError("simulated crash before the rename")  # ... but the process dies

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="simulated"):
        checkpoint.save(path, {"step": 2, "theta": np.zeros(3)})
    monkeypatch.undo()
    back = checkpoint.load(path)
    assert back["step"] == 1
    np.testing.assert_array_equal(back["theta"], np.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.npz"]  # no temporary left behind


def test_torn_temporary_file_from_a_killed_writer_is_ignored_then_removed(tmp_path):
    path = tmp_path / "ck.npz"
    checkpoint.save(path, {"step": 3})
    (tmp_path / ".ck.npz.abcd.tmp").write_bytes(b"PK\x03\x04 torn")  # as SIGKILL would leave
    (tmp_path / ".other.npz.efgh.tmp").write_bytes(b"another file's")
    assert checkpoint.load(path)["step"] == 3
    checkpoint.save(path, {"step": 4})
    assert checkpoint.load(path)["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.npz.efgh.tmp", "ck.npz"]


def test_format_is_plain_npz_with_json_metadata(tmp_path):
    path = checkpoint.save(tmp_path / "ck.npz", {"a": np.arange(3), "b": {"c": 1.5}})
    with np.load(path, allow_pickle=False) as archive:
        meta = json.loads(bytes(archive["__state__.json"]).decode())
        assert meta["format"] == checkpoint.FORMAT_VERSION
        assert meta["state"]["b"] == {"c": 1.5}
        key = meta["state"]["a"]["__ndarray__"]
        np.testing.assert_array_equal(archive[key], np.arange(3))


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.load(tmp_path / "missing.npz")
    with pytest.raises(CheckpointError, match=r"state\.x"):
        checkpoint.save(tmp_path / "ck.npz", {"x": object()})
    with pytest.raises(CheckpointError, match="object arrays"):
        checkpoint.save(tmp_path / "ck.npz", {"x": np.array([None])})
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="unreadable"):
        checkpoint.load(tmp_path / "bad.npz")


# -- stop signals wait for a step boundary -------------------------------------------------
needs_main_thread = pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signal handlers can only be set in the main thread")


@pytest.fixture
def ctrl_c_raises():
    """SIGINT's handler is Python's own (KeyboardInterrupt) during the test, whatever an
    earlier test in this worker process left; the previous one is put back after."""
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@needs_main_thread
@pytest.mark.usefixtures("ctrl_c_raises")
def test_a_stop_signal_waits_for_the_step_to_end():
    boundary, reached = StepBoundary(), []
    with pytest.raises(KeyboardInterrupt), boundary.step():
        signal.raise_signal(signal.SIGINT)  # Ctrl-C in the middle of a step
        reached.append("the rest of the step")
    assert reached == ["the rest of the step"] and not boundary.forced
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


@needs_main_thread
@pytest.mark.usefixtures("ctrl_c_raises")
def test_a_second_stop_signal_stops_at_once():
    boundary, reached = StepBoundary(), []
    with pytest.raises(KeyboardInterrupt), boundary.step():
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        reached.append("never")
    assert reached == [] and boundary.forced
