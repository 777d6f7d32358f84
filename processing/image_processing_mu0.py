"""Image processor for μ0: the RGB frame for the backbone, the same frame for DINOv2, and metric depth as colour."""

import math

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Polynomial fit of the "turbo" colormap (Mikhailov, 2019), so no plotting library is needed at inference.
_TURBO_COEFFICIENTS = np.array(
    [
        [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
        [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
        [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
    ]
)


def turbo_colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to turbo RGB in [0, 1] (shape (..., 3))."""
    x = np.clip(values, 0.0, 1.0)[..., None]
    powers = x ** np.arange(6)
    return np.clip(powers @ _TURBO_COEFFICIENTS.T, 0.0, 1.0)


def render_depth(depth: np.ndarray, log_min: float, log_max: float) -> np.ndarray:
    """Metric depth (H, W) to a turbo image (H, W, 3) in [0, 1]: log depth over the dataset's [p1, p99] range.

    Near is bright; invalid depth (non-finite or <= 1 mm) renders as far, the end the model sees least.
    """
    depth = np.asarray(depth, dtype=np.float64)
    valid = np.isfinite(depth) & (depth > 1e-3)
    log_depth = np.log(np.clip(np.where(valid, depth, np.exp(log_max)), np.exp(log_min), np.exp(log_max)))
    nearness = np.where(valid, 1.0 - (log_depth - log_min) / (log_max - log_min), 0.0)
    # The released renderer looks colours up in a 256-entry table, truncating: quantise the same way.
    return turbo_colormap(np.floor(np.clip(nearness, 0.0, 1.0) * 255) / 255).astype(np.float32)


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")  # how PIL opens 16-bit PNGs; convert("RGB") saturates them


def _pil_to_array(image) -> np.ndarray:
    """A PIL image as (H, W, 3): 16-bit greyscale keeps its uint16 range instead of being clipped to white."""
    if image.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(image).astype(np.int64)
        if grey.size and (grey.min() < 0 or grey.max() > 65535):
            raise ValueError(f"images: a mode {image.mode!r} image must hold 16-bit values, got [{grey.min()}, {grey.max()}].")
        return np.repeat(grey.astype(np.uint16)[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"))


def to_float_image(image) -> np.ndarray:
    """PIL image (8- or 16-bit), integer (uint8, uint16, or other integers in [0, 255]) or float array (H, W, 3),
    or torch tensor (3, H, W), to float32 (H, W, 3) in [0, 1]."""
    if isinstance(image, torch.Tensor):
        array = image.detach().cpu().numpy()
        if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
            array = array.transpose(1, 2, 0)
    else:
        array = _pil_to_array(image) if hasattr(image, "convert") else np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"Expected an RGB image of shape (H, W, 3), got {array.shape}.")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"images: an image is empty ({array.shape[1]}x{array.shape[0]} pixels).")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise ValueError(
                f"images: an {array.dtype} image must hold 8-bit values in [0, 255], got [{array.min()}, {array.max()}]; "
                "pass 16-bit images as uint16."
            )
        return array.astype(np.float32) / 255.0
    if not (np.issubdtype(array.dtype, np.floating) or array.dtype == bool):
        raise ValueError(f"images: unsupported image dtype {array.dtype}; use uint8, uint16 or float in [0, 1].")
    array = array.astype(np.float32)
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise ValueError("Float images must be finite and lie in [0, 1].")
    return array


class Mu0ImageProcessor(BaseImageProcessor):
    r"""
    Resizes one RGB frame (plain bilinear, aspect not kept) to `image_size` normalised to [-1, 1] for the backbone;
    DINOv2 gets that square frame with ImageNet statistics, resized to `dino_image_size`. Optional metric depth is
    rendered as turbo colour at the frame's resolution, then resized like the frame.

    Args:
        image_size (`int`, defaults to 512): backbone input side.
        dino_image_size (`int`, defaults to 518): DINOv2 input side (37 x 37 patches of 14 px).
        image_mean, image_std: backbone normalisation (SigLIP: 0.5, 0.5).
        dino_mean, dino_std: DINOv2 normalisation (ImageNet).
    """

    model_input_names = ["pixel_values", "dino_pixel_values", "depth_pixel_values", "depth_mask"]

    def __init__(
        self,
        image_size: int = 512,
        dino_image_size: int = 518,
        image_mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        image_std: tuple[float, ...] = (0.5, 0.5, 0.5),
        dino_mean: tuple[float, ...] = IMAGENET_MEAN,
        dino_std: tuple[float, ...] = IMAGENET_STD,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for name, value in (("image_size", image_size), ("dino_image_size", dino_image_size)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8192:
                raise ValueError(f"Mu0ImageProcessor {name} must be an integer in [1, 8192], got {value!r}.")
        for name, values in (("image_mean", image_mean), ("image_std", image_std), ("dino_mean", dino_mean),
                             ("dino_std", dino_std)):
            if not isinstance(values, (list, tuple)) or len(values) != 3 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values) \
                    or (name.endswith("std") and min(values) <= 0):
                raise ValueError(f"Mu0ImageProcessor {name} must be three finite numbers{' > 0' if name.endswith('std') else ''}, "
                                 f"got {values!r}.")
        self.image_size = image_size
        self.dino_image_size = dino_image_size
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.dino_mean = list(dino_mean)
        self.dino_std = list(dino_std)

    @staticmethod
    def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
        """Plain bilinear resize to size x size (no antialiasing, aspect not kept), as the released data loader."""
        return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)

    @staticmethod
    def _normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
        mean = torch.tensor(mean, dtype=images.dtype)[None, :, None, None]
        std = torch.tensor(std, dtype=images.dtype)[None, :, None, None]
        return (images - mean) / std

    def _normalize_all(self, frames: list[torch.Tensor], size: int, mean, std) -> torch.Tensor:
        return torch.cat([self._normalize(self._resize(frame, size), mean, std) for frame in frames])

    def preprocess(
        self,
        images,
        depth=None,
        depth_log_range: tuple[float, float] | None = None,
        return_dino: bool = True,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """`images`: one image or a list; `depth`: None, or a list of (H, W) metric maps or None per image."""
        images = images if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("No images were given.")
        arrays = [to_float_image(image) for image in images]
        frames = [torch.from_numpy(array).permute(2, 0, 1)[None] for array in arrays]
        backbone_frames = torch.cat([self._resize(frame, self.image_size) for frame in frames])
        data = {"pixel_values": self._normalize(backbone_frames, self.image_mean, self.image_std)}
        if return_dino:
            # DINOv2 sees the backbone's square frame, normalised, then resized (the released order of operations).
            dino_frames = self._normalize(backbone_frames, self.dino_mean, self.dino_std)
            data["dino_pixel_values"] = self._resize(dino_frames, self.dino_image_size)
        if depth is not None:
            data.update(self._preprocess_depth(arrays, depth, depth_log_range))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _preprocess_depth(self, arrays: list[np.ndarray], depth, depth_log_range) -> dict[str, torch.Tensor]:
        depth = depth if isinstance(depth, (list, tuple)) else [depth]
        if len(depth) != len(arrays):
            raise ValueError(f"Got {len(depth)} depth maps for {len(arrays)} images; pass one (or None) per image.")
        if depth_log_range is None:
            raise ValueError(
                "Depth was given but the processor has no `depth_log_range` statistic (log p1/p99 of the training "
                "depth). Load a processor saved with dataset statistics or set Mu0Processor.depth_log_range."
            )
        log_min, log_max = depth_log_range
        rendered, present = [], []
        for index, (image, depth_map) in enumerate(zip(arrays, depth)):
            if depth_map is None:
                rendered.append(torch.zeros(1, 3, *image.shape[:2]))
                present.append(False)
                continue
            depth_map = np.asarray(depth_map)
            if depth_map.shape != image.shape[:2]:
                raise ValueError(
                    f"Depth map {index} has shape {depth_map.shape} but its image is {image.shape[:2]}; "
                    "depth must be aligned with the frame."
                )
            if np.isnan(depth_map).all():
                raise ValueError(f"Depth map {index} is entirely NaN.")
            rendered.append(torch.from_numpy(render_depth(depth_map, log_min, log_max)).permute(2, 0, 1)[None])
            present.append(True)
        return {
            "depth_pixel_values": self._normalize_all(rendered, self.image_size, self.image_mean, self.image_std),
            "depth_mask": torch.tensor(present),
        }


__all__ = ["Mu0ImageProcessor", "render_depth", "turbo_colormap"]
