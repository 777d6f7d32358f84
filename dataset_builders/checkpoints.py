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


__all__ = ["load_checkpoint"]
