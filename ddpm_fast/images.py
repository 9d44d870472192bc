"""Image grids as PNG, and raw samples as .npz, written atomically (temp file, then rename)."""

import math

import numpy as np
import torch

from .fileio import atomic_write


def to_uint8(images):
    """[N, C, H, W] in [-1, 1] -> uint8 numpy [N, H, W, C]."""
    images = images.detach().float().cpu().clamp(-1, 1)
    return ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_grid(images, nrow=None, padding=2, min_tile=32):
    """uint8 [H, W, C] grid of [N, C, H, W] images in [-1, 1], nearly square by default.

    Small images (the 8x8 digits) are enlarged by an integer factor (nearest neighbour) so that
    each tile is at least ``min_tile`` pixels: the grid stays readable and pixel-exact.
    """
    pixels = to_uint8(images)
    n, h, w, c = pixels.shape
    if n == 0:
        raise ValueError("cannot make a grid of 0 images")
    scale = max(1, math.ceil(min_tile / max(h, w)))
    if scale > 1:
        pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for i in range(n):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[top:top + h, left:left + w] = pixels[i]
    return grid


def save_grid(images, path, nrow=None, padding=2, option=None):
    """Writes ``images`` ([N, C, H, W] in [-1, 1]) as one PNG grid at ``path`` (``option``: the
    command-line option that named it, for messages)."""
    from PIL import Image

    grid = make_grid(images, nrow=nrow, padding=padding)
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    atomic_write(path, lambda f: image.save(f, format="PNG"), option)


def save_npz(images, path, option=None, labels=None):
    """Writes the samples as uint8 [N, H, W, C] under key ``arr_0`` (the layout FID tools read),
    the float values in [-1, 1] as ``samples`` [N, C, H, W] and, for class-conditional samples,
    their class labels [N] as ``labels``."""
    arrays = {"arr_0": to_uint8(images), "samples": images.detach().float().cpu().numpy()}
    if labels is not None:
        arrays["labels"] = labels.detach().cpu().numpy()
    atomic_write(path, lambda f: np.savez(f, **arrays), option)
