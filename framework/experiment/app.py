"""The ``hyperkrylov`` console command: a Hydra application around ``runner.run``.  Its
configs ship inside the package (``conf/``, searched as ``pkg://conf``), so it works from
any working directory (examples: README)."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, NoReturn

import hydra
from hydra.errors import ConfigCompositionException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ValidationError

from framework.experiment.checkpoint import CheckpointError
from framework.experiment.config import ConfigError, validate
from framework.experiment.runner import run
from framework.experiment.tracking import (
    TrackingError,
    check_writable,
    end_sweep,
    prepare_experiment,
    resolve_uri,
)
from framework.experiment.train import DivergedError

CONFIG_PATH = "pkg://conf"


class TrackingSetup(Callback):
    """Hydra callback: before a sweep's jobs start, validate the base config and create
    the MLflow experiment (and SQLite schema) once, so parallel jobs do not race on it;
    after them, end the sweep's parent run (which its first job created)."""

    uri: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            c = validate(OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]))
            if c.tracking.enabled:
                check_writable(uri := resolve_uri(c.tracking.uri))
                prepare_experiment(uri, c.tracking.experiment)
                self.uri = uri
        except (ConfigError, TrackingError):
            return  # each job reports the error itself, with the job's overrides applied

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.uri is not None:
            end_sweep(self.uri, config.hydra.sweep.dir)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def _main(cfg: DictConfig) -> float:
    try:
        return run(cfg).final_loss
    except ConfigError as exc:
        _fail(2, f"configuration error: {exc}")
    except TrackingError as exc:
        _fail(3, f"tracking error: {exc}")
    except (CheckpointError, DivergedError) as exc:
        _fail(2, str(exc))


def _fail(code: int, message: str) -> NoReturn:
    print(f"hyperkrylov: {message}", file=sys.stderr)
    sys.exit(code)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what a scheduler sends on preemption), handled like Ctrl-C: the run saves a
    checkpoint, ends KILLED, and a rerun resumes it."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def main() -> None:
    """Console entry point (arguments are Hydra overrides from ``sys.argv``); every error
    is one line with the exit code of the README (``HYDRA_FULL_ERROR`` lets composition
    errors reach this function instead of Hydra's multi-line report)."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    signal.signal(signal.SIGTERM, _terminate)
    try:
        _main()
    except KeyboardInterrupt as exc:  # the run said what it saved; no traceback
        sys.exit(143 if isinstance(exc, Terminated) else 130)
    except ConfigCompositionException as exc:
        cause = exc.__cause__
        if isinstance(cause, ValidationError):
            _fail(2, f"configuration error: {cause.full_key}: {str(cause).splitlines()[0]}")
        detail = "" if cause is None else f": {str(cause).splitlines()[0]}"
        _fail(1, f"{str(exc).splitlines()[0]}{detail}")
    except OSError as exc:  # e.g. Hydra cannot create the output folder (after the
        # composition errors: a missing config group option is an OSError too)
        if exc.filename is None:
            raise
        _fail(2, f"cannot write {exc.filename}: {exc.strerror}; choose a writable folder "
                 "(hydra.run.dir, hydra.sweep.dir) or fix its permissions")


if __name__ == "__main__":
    main()
