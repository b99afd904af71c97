"""Hydra configuration for ``hyperkrylov`` (shipped as package data: ``pkg://conf``)."""
