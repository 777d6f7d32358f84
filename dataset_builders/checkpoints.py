"""Loading the learned stages' checkpoints with errors that say what is missing and how to get it."""


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


__all__ = ["load_checkpoint", "resolve_model_and_processor"]
