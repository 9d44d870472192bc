"""What the diffusers readers and writers share: their error type and json file helpers."""

import json
import os

from ...images import atomic_write
from ...validation import describe


class DiffusersFormatError(ValueError):
    """A diffusers folder, config or state_dict ddpm_fast cannot use; the message says why."""


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DiffusersFormatError(f"cannot read {path!r}: {error}") from None
    if not isinstance(value, dict):
        raise DiffusersFormatError(f"{path!r} holds {type(value).__name__}, expected a JSON object")
    return value


def _existing_folder(name, folder, what):
    """``folder`` as a str; a TypeError naming ``name`` unless it is a path, an error unless it is a folder."""
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"{name} must be the path of {what}, got {describe(folder)}")
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise DiffusersFormatError(f"{folder!r} is not a folder" if os.path.exists(folder)
                                   else f"{folder!r} does not exist")
    return folder


def _write_json(path, value):
    text = json.dumps(value, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
