"""Adapters over diffusers pipelines, one file per model family behind one interface (`base.py`).

`PipelineAdapter(pipe)` returns the adapter of the pipeline's family; `check_pipeline(pipe)` names
the family or raises TypeError naming the supported classes. Families register themselves with
`@register_family` when their module is imported below; adding one is a new module plus one import
line here (see the README, "Adding a model family").
"""

from .base import (
    PipelineAdapter,
    PromptEmbeds,
    adapter_class,
    check_pipeline,
    families,
    register_family,
    supported_pipeline_classes,
)
from .ddpm import DDPMAdapter, scheduler_from_config
from .flow import FlowMatchingAdapter
from .flux import FluxAdapter
from .sd import SDAdapter
from .sd3 import SD3Adapter
from .sdxl import SDXLAdapter

SUPPORTED = supported_pipeline_classes()

__all__ = [
    "PipelineAdapter", "PromptEmbeds", "adapter_class", "check_pipeline", "families", "register_family",
    "supported_pipeline_classes", "DDPMAdapter", "FlowMatchingAdapter", "SDAdapter", "SDXLAdapter", "SD3Adapter",
    "FluxAdapter", "SUPPORTED", "scheduler_from_config",
]
