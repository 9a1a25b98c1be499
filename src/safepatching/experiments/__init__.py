"""Experiments built from the stages: the pipeline, model comparison, bench, continual PSA and the sweep.

``from safepatching.experiments import run_pipeline`` is the Python API of `safepatching run`.
"""

from safepatching.experiments.pipeline import RunResult, run_pipeline

__all__ = ["RunResult", "run_pipeline"]
