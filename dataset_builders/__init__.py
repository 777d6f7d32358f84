"""TraceExtract: videos in, globally aligned 3D trace records out, as `datasets` builders."""

from .extraction import ExtractionSettings
from .statistics import TraceStatistics, load_statistics, save_statistics
from .trace_extract import TraceExtract, TraceExtractConfig, decode_depth_mm, decode_sample

__all__ = [
    "ExtractionSettings",
    "TraceExtract",
    "TraceExtractConfig",
    "TraceStatistics",
    "decode_depth_mm",
    "decode_sample",
    "load_statistics",
    "save_statistics",
]
