"""Settings: one typed config per stage, the experiment configs, and how YAML and flags fill them.

The most used names are importable from here: ``from safepatching.config import PipelineConfig``.
"""

from safepatching.config.experiments import BenchConfig, ContinualConfig
from safepatching.config.loading import build_config, dump_config
from safepatching.config.settings import PipelineConfig

__all__ = ["BenchConfig", "ContinualConfig", "PipelineConfig", "build_config", "dump_config"]
