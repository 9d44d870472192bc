"""The FID Inception network: the 2015-12-05 TensorFlow Inception graph as ported to PyTorch by
pytorch-fid and torch-fidelity (2048-d pool features), in plain torch.nn.

Input convention (torch-fidelity's, the TensorFlow original's): uint8 images [N, 3, H, W]
(grey images are repeated to 3 channels), resized to 299 x 299 with TensorFlow 1's bilinear
resize (``align_corners=False``, no antialiasing: what the original graph does, reproduced
exactly), then mapped to [-1, 1] as ``(x - 128) / 128``. The weights file is the one both
projects download (same content, two names); it is read with ``torch.load(weights_only=True)``.
"""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .scores import MetricsError

WEIGHTS_FILES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
WEIGHTS_URLS = {
    WEIGHTS_FILES[0]: "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILES[0],
    WEIGHTS_FILES[1]: "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + WEIGHTS_FILES[1],
}
INPUT_SIZE = 299


def hub_checkpoint_dir():
    """Where torch.hub (and so pytorch-fid and torch-fidelity) keeps downloaded weights."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def find_weights(weights=None, download=False, progress=True):
    """Path of the Inception weights: ``weights`` if given, else either file name in the torch hub
    cache; downloads there only when ``download`` is true. Raises MetricsError saying what to put where."""
    if weights is not None:
        weights = os.fspath(weights)
        if not os.path.isfile(weights):
            raise MetricsError(f"Inception weights file {weights!r} does not exist")
        return weights
    folder = hub_checkpoint_dir()
    for name in WEIGHTS_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    where = (f"put {WEIGHTS_FILES[0]} (pytorch-fid's) or {WEIGHTS_FILES[1]} (torch-fidelity's; the same "
             f"weights) into {folder}, or pass its path")
    if not download or os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("DDPM_FAST_OFFLINE") == "1":
        raise MetricsError(f"the FID Inception weights were not found: {where}"
                           + ("" if download else " (or allow the download: --download-weights / download=True)"))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, WEIGHTS_FILES[0])
    try:
        torch.hub.download_url_to_file(WEIGHTS_URLS[WEIGHTS_FILES[0]], path, progress=progress)
    except Exception as error:  # offline, proxy, HTTP error: say what to do by hand
        raise MetricsError(f"downloading the FID Inception weights failed ({type(error).__name__}: {error}); "
                           f"{where}") from None
    return path


def resize_bilinear_tf1(x, size):
    """TensorFlow 1.x ``resize_bilinear`` (align_corners=False, half_pixel_centers=False) of a
    float [N, C, H, W] tensor: source coordinate ``i * in / out``, its floor and the next pixel
    (clamped to the edge), blended linearly. Equal to torch-fidelity's "slow" (exact) method."""
    out_h, out_w = size

    def axis(out_size, in_size):
        position = torch.arange(out_size, dtype=x.dtype, device=x.device) * torch.tensor(
            in_size / out_size, dtype=torch.float32)
        low = position.long()
        high = (low + 1).clamp_max(in_size - 1)
        return low, high, position - low.to(position.dtype)

    y_low, y_high, dy = axis(out_h, x.shape[2])
    x_low, x_high, dx = axis(out_w, x.shape[3])
    top, bottom = x[:, :, y_low, :], x[:, :, y_high, :]
    a, b = top[:, :, :, x_low], top[:, :, :, x_high]
    c, d = bottom[:, :, :, x_low], bottom[:, :, :, x_high]
    dx = dx.view(1, 1, 1, out_w)
    upper = a + (b - a) * dx
    lower = c + (d - c) * dx
    return upper + (lower - upper) * dy.view(1, 1, out_h, 1)


class BasicConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x):
    # TensorFlow's average pool does not count the zero padding.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_tf(x)),
        ], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = layer(d7)
        return torch.cat([self.branch1x1(x), b7, d7, self.branch_pool(_avg_pool_tf(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b pools with an average (padding not counted), Mixed_7c with a max: as the
    TensorFlow graph does (max_pool=True for the second block)."""

    def __init__(self, in_channels, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_tf(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3),
            self.branch_pool(pooled),
        ], 1)


# pytorch-fid's InceptionV3 wrapper keeps the same layers in nn.Sequential blocks; a state dict
# saved from it ("blocks.I.J.<rest>") maps onto the names here (pooling layers hold no weights).
_PYTORCH_FID_BLOCKS = [
    ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"],
    ["Conv2d_3b_1x1", "Conv2d_4a_3x3"],
    ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"],
    ["Mixed_7a", "Mixed_7b", "Mixed_7c"],
]


def _canonical_state_dict(state):
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    out = {}
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key.startswith("AuxLogits."):  # torchvision's Inception3 with aux_logits: not used here
            continue
        if key.startswith("blocks."):
            _, block, index, rest = key.split(".", 3)
            block, index = int(block), int(index)
            # block 0 and 1 have a max pool after their convolutions, 3 an average pool: no weights
            key = f"{_PYTORCH_FID_BLOCKS[block][index]}.{rest}"
        out[key] = value
    return out


class InceptionFeatures(nn.Module):
    """2048-d pool features of the FID Inception network from uint8 images [N, 1 or 3, H, W].

    weights: path of the weights file; None looks for pytorch-fid's or torch-fidelity's file in
    the torch hub cache (``torch.hub.get_dir()/checkpoints``), downloading it only if ``download``.
    ``state_dict``: use these weights instead (tests). The network is in eval mode, without
    gradients, always (its batch norms use the stored statistics).
    """

    name = "inception"
    dims = 2048

    def __init__(self, weights=None, download=False, state_dict=None, progress=True):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the classifier: in the weights file, unused for features
        self.weights_path = None
        if state_dict is None:
            self.weights_path = find_weights(weights, download=download, progress=progress)
            try:
                state_dict = torch.load(self.weights_path, map_location="cpu", weights_only=True)
            except Exception as error:
                raise MetricsError(f"cannot read the Inception weights {self.weights_path!r}: {error}") from None
        try:
            self.load_state_dict(_canonical_state_dict(state_dict))
        except (RuntimeError, ValueError, IndexError, AttributeError) as error:
            raise MetricsError(f"the Inception weights do not fit the FID Inception network "
                               f"(pytorch-fid's or torch-fidelity's file expected): {str(error)[:300]}") from None
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)  # never training mode: the batch norms must use their statistics

    @torch.no_grad()
    def forward(self, images):
        if images.dtype != torch.uint8:
            raise MetricsError(f"InceptionFeatures takes uint8 images [N, 3, H, W], got {images.dtype} "
                               f"(quantise samples with ddpm_fast.metrics.to_uint8 first)")
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise MetricsError(f"InceptionFeatures takes images [N, 1 or 3, H, W], got shape {tuple(images.shape)}")
        # Full float32 convolutions on GPUs too: cuDNN's default TF32 would change the features
        # by about 1e-3 relative.
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=torch.backends.cudnn.benchmark,
                                        deterministic=torch.backends.cudnn.deterministic, allow_tf32=False):
            return self._features(images.to(self.fc.weight.device))

    def _features(self, x):
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = resize_bilinear_tf1(x.float(), (INPUT_SIZE, INPUT_SIZE))
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1).float()
