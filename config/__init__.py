"""``pipeline.yaml``: the configuration models and the located loader.

The models (``config._models``) only describe a pipeline -- unknown keys are errors --
and the composition root (``pipeline._compose``) turns their sections into runtime
objects.  Above :mod:`core`, below every component.
"""

from ._loader import load_config
from ._models import PipelineConfig

__all__ = ["PipelineConfig", "load_config"]
