"""Where the benchmark scripts (run by path, so this folder is on `sys.path`) write their results."""

import json
import os


def write_json(result: dict, path: str) -> None:
    """`result` as indented JSON at `path`, through a temporary file so an interrupted run leaves no half file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as handle:
        json.dump(result, handle, indent=2)
    os.replace(path + ".tmp", path)
