"""μ0: a 3D interaction-trace world model, native to the Hugging Face stack.

The classes load on first use (PEP 562), so `mu0 --help` starts without importing torch or transformers. Using any
of them (`from mu0 import Mu0ForTracePrediction`) registers the Auto classes, so `AutoModel.from_pretrained` works
on μ0 checkpoints without `trust_remote_code`, and registers `pipeline("trace-prediction")`.
"""

import importlib

__version__ = "0.1.0"

_SOURCES = {
    "Mu0Config": ".configuration_mu0",
    "Mu0ActionConfig": ".configuration_mu0_action",
    "Mu0ForTracePrediction": ".modeling_mu0",
    "Mu0ForDenseTracePrediction": ".modeling_mu0",
    "Mu0ForTraceRegression": ".modeling_mu0",
    "Mu0Model": ".modeling_mu0",
    "Mu0PreTrainedModel": ".modeling_mu0",
    "Mu0TraceOutput": ".modeling_mu0",
    "Mu0TracePrediction": ".modeling_mu0",
    "Mu0TracePredictionPipeline": ".pipeline_mu0",
    "Mu0ActionOutput": ".modeling_mu0_action",
    "Mu0ForActionPrediction": ".modeling_mu0_action",
    "Mu0ActionProcessor": ".processing",
    "Mu0ImageProcessor": ".processing",
    "Mu0Processor": ".processing",
    "build_character_tokenizer": ".processing",
}


def _register_auto_classes() -> None:
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor
    from transformers.pipelines import PIPELINE_REGISTRY

    from .configuration_mu0 import Mu0Config
    from .configuration_mu0_action import Mu0ActionConfig
    from .modeling_mu0 import (
        Mu0ForDenseTracePrediction,
        Mu0ForDenseTraceRegression,
        Mu0ForTracePrediction,
        Mu0ForTraceRegression,
    )
    from .modeling_mu0_action import Mu0ForActionPrediction
    from .pipeline_mu0 import TASK, Mu0TracePredictionPipeline
    from .processing import Mu0ActionProcessor, Mu0ImageProcessor, Mu0Processor

    AutoConfig.register(Mu0Config.model_type, Mu0Config, exist_ok=True)
    AutoModel.register(Mu0Config, Mu0ForTracePrediction, exist_ok=True)
    AutoConfig.register(Mu0ActionConfig.model_type, Mu0ActionConfig, exist_ok=True)
    AutoModel.register(Mu0ActionConfig, Mu0ForActionPrediction, exist_ok=True)
    AutoProcessor.register(Mu0ActionConfig, Mu0ActionProcessor, exist_ok=True)
    AutoImageProcessor.register(Mu0Config, slow_image_processor_class=Mu0ImageProcessor, exist_ok=True)
    AutoProcessor.register(Mu0Config, Mu0Processor, exist_ok=True)
    if TASK not in PIPELINE_REGISTRY.supported_tasks:
        PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=Mu0TracePredictionPipeline, pt_model=AutoModel, type="multimodal")

    # save_pretrained also writes the code, so checkpoints load with trust_remote_code where mu0 is not installed.
    Mu0Config.register_for_auto_class()
    for trace_model in (Mu0ForTracePrediction, Mu0ForDenseTracePrediction, Mu0ForTraceRegression, Mu0ForDenseTraceRegression):
        trace_model.register_for_auto_class("AutoModel")  # a saved baseline's auto_map names its own class
    Mu0ActionConfig.register_for_auto_class()
    Mu0ForActionPrediction.register_for_auto_class("AutoModel")
    Mu0ImageProcessor.register_for_auto_class("AutoImageProcessor")
    Mu0Processor.register_for_auto_class("AutoProcessor")


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _register_auto_classes()
    for exported, source in _SOURCES.items():
        globals()[exported] = getattr(importlib.import_module(source, __name__), exported)
    return globals()[name]


def __dir__() -> list[str]:
    return sorted([*globals(), *_SOURCES])


__all__ = sorted(_SOURCES)
