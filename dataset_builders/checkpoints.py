"""Loading the learned stages' checkpoints with errors that say what is missing and how to get it."""

import functools
import os


def load_checkpoint(auto_class, name: str, what: str):
    """`auto_class.from_pretrained(name)`, raising an OSError that names the checkpoint and the usual cause here."""
    try:
        return auto_class.from_pretrained(name)
    except OSError as error:
        raise OSError(
            f"Could not load the {what} from {name!r}: it is neither a local folder nor in the Hub cache, and it "
            "cannot be downloaded (offline, e.g. HF_HUB_OFFLINE=1, or no such repository). Download it where the "
            "Hub is reachable, pass a local path, or pass the object itself."
        ) from error


def resolve_model_and_processor(model, processor, name: str | None, model_class, processor_class, what: str):
    """The given model and processor, loading whichever is missing from `name` (which is then required)."""
    processor_label = "image processor" if "ImageProcessor" in processor_class.__name__ else "processor"
    if (model is None or processor is None) and name is None:
        raise ValueError(f"Pass model_name_or_path, or both a {what} model and its {processor_label}.")
    if model is None:
        model = load_checkpoint(model_class, name, f"{what} model")
    if processor is None:
        processor = load_checkpoint(processor_class, name, f"{what} {processor_label}")
    return model, processor


def require_checkpoints(settings) -> None:
    """Fail before a build starts when a learned stage chosen in `settings` (an `ExtractionSettings`) has no
    checkpoint it can load here, naming the setting and the fix, instead of failing inside every episode.

    A Hub checkpoint counts as loadable when it is a local folder, when its config is in the local Hub cache, or,
    unless HF_HUB_OFFLINE is set, when the Hub answers for it. CoTracker's repository folder and checkpoint file
    must exist.
    """
    stages = (
        ("depth", "depth_anything", "depth_model"),
        ("keypoints", "dino", "dino_model"),
        ("captions", "vlm", "caption_model"),
    )
    missing = [
        (field, getattr(settings, field))
        for stage, backend, field in stages
        if getattr(settings, stage) == backend and not _loadable(getattr(settings, field))
    ]
    if missing:
        listed = "; ".join(f"{field}={name!r}" for field, name in missing)
        raise OSError(
            f"Checkpoint(s) not available here: {listed}. Each must be a local folder or in the Hub cache"
            f"{' (HF_HUB_OFFLINE is set)' if _offline() else ', and the Hub could not be reached'}. Fix: where the "
            "Hub is reachable run `hf download <name>` (it fills the cache), or pass a local folder as the setting."
        )
    if settings.tracker == "cotracker":
        from .tracking import check_hub_tracker_files

        check_hub_tracker_files(settings.cotracker_repo, settings.cotracker_checkpoint)


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=16)
def _loadable(name: str) -> bool:
    from huggingface_hub import model_info, try_to_load_from_cache

    if os.path.isdir(name):
        return True
    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return True
    except ValueError:  # not a valid repository id either (HFValidationError is a ValueError)
        return False
    if _offline():
        return False
    try:
        model_info(name, timeout=10)
    except Exception:  # no network, no such repository, gated: all mean it cannot be loaded from here
        return False
    return True


__all__ = ["load_checkpoint", "require_checkpoints", "resolve_model_and_processor"]
