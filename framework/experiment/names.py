"""MLflow tag and metric names, defined once for the writers (train, resolve, runner,
cluster) and the readers (compare, paper)."""

from __future__ import annotations

# -- tags ------------------------------------------------------------------------------------
TASK_TAG = "hyperkrylov.task"
STRATEGY_TAG = "hyperkrylov.strategy"
DIM_TAG = "hyperkrylov.dim"
STOP_TAG = "hyperkrylov.stop"
WHICH_TAG = "hyperkrylov.which"
LABEL_TAG = "hyperkrylov.label"
SEQUENCE_TAG = "hyperkrylov.sequence"
SWEEP_TAG = "hyperkrylov.sweep_id"
OUTPUT_DIR_TAG = "hyperkrylov.output_dir"
JOB_NUM_TAG = "hyperkrylov.job_num"
OVERRIDES_TAG = "hyperkrylov.overrides"
# writes that waited in the output folder during a store outage, sent later
BUFFERED_WRITES_TAG = "hyperkrylov.buffered_writes"
RECORD_RUN_TAG = "hyperkrylov.record_run_id"  # of a re-solve: the run that recorded it
# a Dask run that lost workers: how many in all, and the steps that lost them ("4,7")
LOST_WORKERS_TAG = "hyperkrylov.lost_workers"
LOST_WORKER_STEPS_TAG = "hyperkrylov.lost_worker_steps"
STALLED_TAG = "hyperkrylov.stalled_after_step"  # a full-batch line search found no descent

RUN_ID_FILE = "mlflow_run_id"  # in a run's output folder: the id of its MLflow run

# -- training-step metrics -------------------------------------------------------------------
UPPER_LOSS = "upper_loss"
KRYLOV_ITERATIONS = "krylov_iterations"
BASELINE_KRYLOV_ITERATIONS = "baseline_krylov_iterations"
OPERATOR_APPLICATIONS = "operator_applications"
HG_ERROR_ESTIMATE = "hg_error_estimate"
HVP, JAC_T, BASELINE_HVP = "hvp", "jac_t", "baseline_hvp"
STEP_TIME, BATCH_SIZE = "step_time", "batch_size"
OUTER_STEP_SIZE, OUTER_BACKTRACKS = "outer_step_size", "outer_backtracks"
# a Dask run's steps (framework.experiment.cluster): slowest worker's seconds over the mean,
# workers lost and samples cold-started (their shard re-created without a checkpoint)
WORKER_IMBALANCE, WORKERS_LOST, COLD_STARTED = "worker_imbalance", "workers_lost", "cold_started"
# Step metrics that are counts: their running sums are logged as cumulative(key).
TRAIN_COUNTS = (KRYLOV_ITERATIONS, "lower_iterations", HVP, "hvp_passes", JAC_T,
                "jac_t_passes", OPERATOR_APPLICATIONS, "operator_passes",
                BASELINE_KRYLOV_ITERATIONS, BASELINE_HVP, BATCH_SIZE, STEP_TIME)

# -- re-solve metrics (per recorded system) --------------------------------------------------
ITERATIONS, APPLICATIONS, PASSES, SOLVE_TIME = "iterations", "applications", "passes", "solve_time"
HG_ERROR = "hg_error"
MEAN_HG_ERROR, MAX_HG_ERROR = "mean_hg_error", "max_hg_error"
RESOLVE_COUNTS = (ITERATIONS, HVP, "hvp_passes", JAC_T, "jac_t_passes", APPLICATIONS, PASSES,
                  SOLVE_TIME)


def cumulative(key: str) -> str:
    """The running sum of count ``key`` over steps (systems) 0..k."""
    return f"cumulative_{key}"


def total(key: str) -> str:
    """The total of count ``key`` of a re-solve (logged once, after the last system)."""
    return f"total_{key}"
