"""The experiment layer: the Hydra app, tasks, MLflow tracking, checkpoints and reports."""
