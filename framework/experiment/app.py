"""The ``hyperkrylov`` console command: a Hydra application around ``runner.run``.

Configs ship inside the package (``conf/``, searched as ``pkg://conf``), so the command
works from any working directory.  Examples::

    hyperkrylov                                      # default MNIST inpainting run
    hyperkrylov problem=quadratic recycle=harmonic_ritz recycle.dim=4
    hyperkrylov -m recycle=ritz,harmonic_ritz recycle.dim=5,10   # a sweep
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from framework.experiment.config import ConfigError, validate
from framework.experiment.runner import run
from framework.experiment.tracking import TrackingError, prepare_experiment, resolve_uri

CONFIG_PATH = "pkg://conf"


class TrackingSetup(Callback):
    """Hydra callback: before a sweep's jobs start, validate the base config and create
    the MLflow experiment (and SQLite schema) once, so parallel jobs do not race on it."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            c = validate(_without_hydra(config))
            if c.tracking.enabled:
                prepare_experiment(resolve_uri(c.tracking.uri), c.tracking.experiment)
        except (ConfigError, TrackingError):
            return  # each job reports the error itself, with the job's overrides applied


def _without_hydra(config: DictConfig) -> DictConfig:
    from omegaconf import OmegaConf, open_dict

    copy = OmegaConf.create(OmegaConf.to_container(config, resolve=False))
    with open_dict(copy):
        copy.pop("hydra", None)
    return copy


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def _main(cfg: DictConfig) -> float:
    try:
        summary = run(cfg)
    except ConfigError as exc:
        print(f"hyperkrylov: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    except TrackingError as exc:
        print(f"hyperkrylov: tracking error: {exc}", file=sys.stderr)
        sys.exit(3)
    return summary.final_loss


def main() -> None:
    """Console entry point (arguments are Hydra overrides from ``sys.argv``)."""
    _main()


if __name__ == "__main__":
    main()
