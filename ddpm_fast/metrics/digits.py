"""A feature network for the 8x8 digits: the FID's Inception network means nothing on 8x8 grey
images, so the digits model is scored on the features of a small digit classifier instead.

The network (three 3x3 convolutions, 64-d features, a 10-way head) is trained on the training
split of ``ddpm_fast.data.load_dataset("digits", "train")`` only (the held-out tenth stays
unseen), deterministically on the CPU in a few seconds, and ships as
``ddpm_fast/assets/digits_features.pt``. Its features are the 64 pre-activation values of the
penultimate layer, scaled to unit mean variance over the training digits. A "digits FID"
computed on them is specific to this network: it ranks models and samplers of the digits, and
is not comparable with an Inception FID.

Input convention: uint8 images [N, 1, 8, 8] (samples quantised as ``images.to_uint8`` does).
"""

import hashlib
import os
from importlib import resources

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .scores import MetricsError

ASSET = "digits_features.pt"
TRAINING = dict(epochs=60, batch_size=64, lr=3e-3, weight_decay=1e-4, seed=0)


def shipped_path():
    return str(resources.files("ddpm_fast") / "assets" / ASSET)


class DigitsNet(nn.Module):
    """uint8 [N, 1, 8, 8] -> 64-d features (``features``) and 10 digit logits (``forward``)."""

    dims = 64

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 2 * 2, self.dims)
        self.head = nn.Linear(self.dims, 10)

    @staticmethod
    def _normalise(images):
        if images.dtype != torch.uint8:
            raise MetricsError(f"the digits feature network takes uint8 images, got {images.dtype}")
        if images.dim() != 4 or tuple(images.shape[1:]) != (1, 8, 8):
            raise MetricsError(f"the digits feature network takes 8x8 grey images [N, 1, 8, 8], got shape "
                               f"{tuple(images.shape)} (use --features inception for other data)")
        return images.float() / 127.5 - 1.0

    def features(self, images):
        x = self._normalise(images)
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)  # 4x4
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # 2x2
        return self.fc(x.flatten(1))

    def forward(self, images):
        return self.head(F.relu(self.features(images)))


class DigitsFeatures(nn.Module):
    """The shipped digits feature network (or ``weights``), in eval mode, without gradients."""

    name = "digits"
    dims = DigitsNet.dims

    def __init__(self, weights=None):
        super().__init__()
        self.weights_path = os.fspath(weights) if weights is not None else shipped_path()
        try:
            state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
            self.net = DigitsNet()
            self.net.load_state_dict({k: v.float() for k, v in state["weights"].items()})
        except (OSError, RuntimeError, KeyError, TypeError) as error:
            raise MetricsError(f"cannot load the digits feature network {self.weights_path!r}: {error}") from None
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, images):
        device = self.net.fc.weight.device
        return self.net.features(images.to(device)).float()


def _digit_labels(images):
    """Labels of load_dataset('digits', split)'s images, found by matching the raw pixels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    index = {bytes(image.astype(np.uint8).tobytes()): int(label) for image, label in zip(digits.images, digits.target)}
    raw = ((images[:, 0].numpy() + 1.0) * 8.0).round().astype(np.uint8)  # back to 0..16
    return torch.tensor([index[bytes(image.tobytes())] for image in raw])


def train_digits_features(out=None, epochs=TRAINING["epochs"], batch_size=TRAINING["batch_size"],
                          lr=TRAINING["lr"], weight_decay=TRAINING["weight_decay"], seed=TRAINING["seed"]):
    """Trains the digits feature network on the digits' training split (deterministic on a CPU);
    writes it to ``out`` (float16 weights) when given. Returns (net, held-out accuracy)."""
    from ..data import load_dataset
    from ..images import atomic_write, to_uint8

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a network this small trains fastest (and reproducibly) on one thread
    try:
        return _train(out, epochs, batch_size, lr, weight_decay, seed, load_dataset, atomic_write, to_uint8)
    finally:
        torch.set_num_threads(threads)


def _train(out, epochs, batch_size, lr, weight_decay, seed, load_dataset, atomic_write, to_uint8):
    def as_uint8(images):
        return torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).contiguous()

    train_images, test_images = load_dataset("digits", "train"), load_dataset("digits", "test")
    x, y = as_uint8(train_images), _digit_labels(train_images)
    x_test, y_test = as_uint8(test_images), _digit_labels(test_images)
    torch.manual_seed(seed)
    net = DigitsNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            batch = order[start:start + batch_size]
            # one-pixel random shifts: features that do not hinge on exact positions
            shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
            images = torch.roll(x[batch], shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(net(images), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
    net.eval()
    with torch.no_grad():
        # Scale the features to unit mean variance on the training digits (the logits are
        # unchanged: ReLU commutes with a positive scale), so the distances are of order one.
        scale = net.features(x).var(dim=0).mean().sqrt()
        net.fc.weight /= scale
        net.fc.bias /= scale
        net.head.weight *= scale
        accuracy = float((net(x_test).argmax(1) == y_test).float().mean())
    if out is not None:
        weights = {k: v.detach().half() for k, v in net.state_dict().items()}
        state = {"weights": weights, "held_out_accuracy": accuracy, "training": dict(TRAINING, epochs=epochs,
                 batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed)}
        atomic_write(out, lambda f: torch.save(state, f))
    return net, accuracy


_SHA256 = {}


def file_sha256(path):
    """sha256 of a file's bytes (remembered per path, size and mtime)."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _SHA256[key] = digest.hexdigest()
    return _SHA256[key]

