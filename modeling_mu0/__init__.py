"""μ0: a 3D interaction-trace world model, native to the Hugging Face stack.

Importing `mu0` registers the Auto classes, so `AutoModel.from_pretrained` works on μ0 checkpoints without
`trust_remote_code`.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor

from .configuration_mu0 import Mu0Config
from .configuration_mu0_action import Mu0ActionConfig
from .modeling_mu0 import Mu0ForTracePrediction, Mu0PreTrainedModel, Mu0TraceOutput, Mu0TracePrediction
from .modeling_mu0_action import Mu0ActionOutput, Mu0ForActionPrediction
from .processing import Mu0ActionProcessor, Mu0ImageProcessor, Mu0Processor, build_character_tokenizer

__version__ = "0.1.0"

AutoConfig.register(Mu0Config.model_type, Mu0Config, exist_ok=True)
AutoModel.register(Mu0Config, Mu0ForTracePrediction, exist_ok=True)
AutoConfig.register(Mu0ActionConfig.model_type, Mu0ActionConfig, exist_ok=True)
AutoModel.register(Mu0ActionConfig, Mu0ForActionPrediction, exist_ok=True)
AutoProcessor.register(Mu0ActionConfig, Mu0ActionProcessor, exist_ok=True)
AutoImageProcessor.register(Mu0Config, slow_image_processor_class=Mu0ImageProcessor, exist_ok=True)
AutoProcessor.register(Mu0Config, Mu0Processor, exist_ok=True)

# save_pretrained also writes the code, so checkpoints load with trust_remote_code where mu0 is not installed.
Mu0Config.register_for_auto_class()
Mu0ForTracePrediction.register_for_auto_class("AutoModel")
Mu0ActionConfig.register_for_auto_class()
Mu0ForActionPrediction.register_for_auto_class("AutoModel")
Mu0ImageProcessor.register_for_auto_class("AutoImageProcessor")
Mu0Processor.register_for_auto_class("AutoProcessor")

__all__ = [
    "Mu0ActionConfig",
    "Mu0ActionOutput",
    "Mu0ActionProcessor",
    "Mu0Config",
    "Mu0ForActionPrediction",
    "Mu0ForTracePrediction",
    "Mu0ImageProcessor",
    "Mu0PreTrainedModel",
    "Mu0Processor",
    "Mu0TraceOutput",
    "Mu0TracePrediction",
    "build_character_tokenizer",
]
