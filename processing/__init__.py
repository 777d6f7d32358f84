"""μ0 processing: `Mu0Processor` and `Mu0ImageProcessor`."""

from .character_tokenizer import build_character_tokenizer
from .image_processing_mu0 import Mu0ImageProcessor, render_depth, turbo_colormap
from .processing_mu0 import Mu0Processor
from .processing_mu0_action import Mu0ActionProcessor, robot_statistics
from .visualization import draw_traces, plot_traces_3d, to_rerun

__all__ = [
    "Mu0ActionProcessor",
    "Mu0ImageProcessor",
    "Mu0Processor",
    "build_character_tokenizer",
    "draw_traces",
    "plot_traces_3d",
    "render_depth",
    "robot_statistics",
    "to_rerun",
    "turbo_colormap",
]
