"""Checkpoints: plain tensors and Python values only, loaded with ``torch.load(weights_only=True)``.

A training checkpoint holds ``model``, ``ema``, ``optimizer``, ``scaler`` (state dicts),
``step``, ``rng`` (torch, CUDA, numpy and python states as tensors and lists) and ``config``
(the full run configuration as a plain dict: ``config["model"]`` rebuilds the UNet,
``config["diffusion"]`` the GaussianDiffusion). A sampling-only checkpoint (the shipped model)
holds ``config``, ``ema`` and ``step``. Files are written to a temporary name and renamed, so
a crash mid-write leaves the previous checkpoint intact.
"""

import os
import pickle
import random
import zipfile
from importlib import resources

import numpy as np
import torch

from .fileio import atomic_write

FORMAT_VERSION = 1
SHIPPED = "digits.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def save(state, path, option=None):
    state = dict(state, format_version=FORMAT_VERSION)
    atomic_write(path, lambda f: torch.save(state, f), option)


def load(path, map_location="cpu"):
    """Loads a checkpoint written by :func:`save` (never arbitrary pickled objects)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a folder, expected a file written by `ddpm-fast train`")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read checkpoint {path!r} (truncated, corrupted or not a ddpm_fast "
                              f"checkpoint): {first_line}") from None
    if not isinstance(state, dict) or "config" not in state or "format_version" not in state:
        raise CheckpointError(f"checkpoint {path!r} is not a ddpm_fast checkpoint (no config/format_version)")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path!r} has format {state['format_version']}, this ddpm_fast "
                              f"reads up to {FORMAT_VERSION} (upgrade ddpm_fast)")
    return state


def shipped_path():
    """Path of the small digits model that ships inside the package."""
    resource = resources.files("ddpm_fast") / "assets" / SHIPPED
    with resources.as_file(resource) as path:  # a real file for a normal (unzipped) install
        return str(path)


def load_weights(module, weights, what, path):
    """``module.load_state_dict(weights)`` with a message naming the file when they do not fit."""
    try:
        module.load_state_dict(weights)
    except (RuntimeError, KeyError, ValueError) as error:
        detail = str(error).strip().splitlines()
        raise CheckpointError(f"the {what} weights in {path!r} do not fit the model built from its config "
                              f"(a checkpoint from another configuration?): {' '.join(detail[:3])}") from None


def rng_states():
    """Every random generator's state as tensors and lists (no pickled numpy objects)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
