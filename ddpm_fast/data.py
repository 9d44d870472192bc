"""Training data: scikit-learn's 8x8 digits, a folder of images, or CIFAR-10's python batches.

Every dataset is loaded once into memory as a float32 tensor [N, C, H, W] in [-1, 1]. The
order in which training visits it is a pure function of (seed, step) (:class:`StepSampler`),
so a resumed run draws exactly the batches the uninterrupted run would have drawn.
"""

import os
import pickle

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = ("test_batch",)
HELD_OUT_FRACTION = 0.1  # for sources without their own test split (digits, image folders)


class DataError(ValueError):
    """The data cannot be used; the message says which path or value and why."""


def load_dataset(source="digits", split="train", image_size=None, channels=None, labels=False):
    """Images of ``source`` as float32 [N, C, H, W] in [-1, 1]; with ``labels=True``, the tuple
    (images, labels, class_names): int64 class indices [N] and the names of the classes.

    source: "digits", a folder of PNG/JPEG images (searched recursively), or a folder holding
    CIFAR-10's python batches (``data_batch_1`` ... ``test_batch``, e.g. the extracted
    ``cifar-10-batches-py``). split: "train" or "test" (the held-out part). image_size and
    channels resize and convert images when given (None keeps the source's own).

    Labels: the digits' own (classes "0" .. "9"); for an image folder, its subfolders name the
    classes (torchvision's ImageFolder convention: class i is the i-th subfolder name in sorted
    order, each holding that class's images, searched recursively); CIFAR-10's labels, named by
    ``batches.meta`` when present. The held-out split is the same with or without labels.
    """
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    if source == "digits":
        images, targets, class_names = _digits()
    elif not isinstance(source, (str, os.PathLike)):
        raise DataError(f"data must be 'digits' or a folder path, got {source!r}")
    elif not os.path.exists(source):
        raise DataError(f"data folder {str(source)!r} does not exist (expected 'digits', a folder of "
                        f"PNG/JPEG images, or a folder with CIFAR-10's python batches)")
    elif not os.path.isdir(source):
        raise DataError(f"data {str(source)!r} is not a folder (expected a folder of PNG/JPEG images "
                        f"or CIFAR-10's python batches)")
    elif _is_cifar(source):
        images, targets = _cifar(source, split)
        images = _resize(images, image_size, channels)
        return (images, targets, _cifar_class_names(source, targets)) if labels else images
    else:
        images, targets, class_names = _image_folder(source, image_size, channels, labels)
    images, targets = _held_out_split(images, targets, split)
    images = _resize(images, image_size, channels)
    return (images, targets, class_names) if labels else images


def _held_out_split(images, targets, split):
    # A fixed permutation (independent of the training seed) so "test" never overlaps "train".
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    n_test = max(1, int(round(len(images) * HELD_OUT_FRACTION)))
    if len(images) < 2:
        raise DataError(f"need at least 2 images to hold some out for testing, got {len(images)}")
    keep = order[:n_test] if split == "test" else order[n_test:]
    return images[keep], None if targets is None else targets[keep]


def _digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = digits.images.astype(np.float32)  # [1797, 8, 8], values 0..16
    images = torch.from_numpy(pixels / 8.0 - 1.0).unsqueeze(1)
    return images, torch.from_numpy(digits.target.astype(np.int64)), [str(name) for name in digits.target_names]


def _class_folders(folder, paths):
    """(labels, class_names) of image paths under ``folder``'s subfolders, ImageFolder-style."""
    class_names = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    loose = [path for path in paths if os.path.dirname(path) == os.path.normpath(folder)]
    if loose:
        raise DataError(f"--class-cond reads the classes from the subfolders of {str(folder)!r} (one per class, "
                        f"e.g. {os.path.join(str(folder), 'cat', 'img0.png')!r}), but {len(loose)} image(s) lie in "
                        f"the folder itself (e.g. {os.path.basename(loose[0])!r}): move them into class subfolders, "
                        f"or train without --class-cond")
    index = {name: i for i, name in enumerate(class_names)}
    labels = [index[os.path.relpath(path, folder).split(os.sep)[0]] for path in paths]
    empty = [name for name in class_names if name not in {os.path.relpath(p, folder).split(os.sep)[0] for p in paths}]
    if empty:
        raise DataError(f"class folder {os.path.join(str(folder), empty[0])!r} holds no images (looked for "
                        f"{', '.join(IMAGE_EXTENSIONS)} files); every subfolder of {str(folder)!r} is a class")
    return torch.tensor(labels, dtype=torch.long), class_names


def _image_folder(folder, image_size, channels, labels=False):
    """(images, labels or None, class names or None) of a folder of images."""
    from PIL import Image, UnidentifiedImageError

    folder = os.path.normpath(os.fspath(folder))
    paths = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(folder)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not paths:
        raise DataError(f"data folder {str(folder)!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)} "
                        f"files, and for CIFAR-10's data_batch_1..5 / test_batch)")
    targets, class_names = _class_folders(folder, paths) if labels else (None, None)
    mode = {None: None, 1: "L", 3: "RGB"}.get(channels, "invalid")
    if mode == "invalid":
        raise DataError(f"channels must be 1 or 3 for image folders, got {channels}")
    arrays = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image = _to_8_bit(image)
                image = image.convert(mode or ("L" if image.mode in GREY_MODES else "RGB"))
                if image_size is not None and image.size != (image_size, image_size):
                    image = _center_crop_resize(image, image_size)
                arrays.append(np.asarray(image, dtype=np.uint8))
        except Image.DecompressionBombError as error:
            raise DataError(f"image {path!r} is too large to read safely ({error}); remove it from the folder or "
                            f"shrink it") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            raise DataError(f"cannot read image {path!r}: {error}; remove or replace it") from None
    if len({a.ndim for a in arrays}) > 1:  # grey and colour images: grey ones become grey RGB (lossless)
        arrays = [np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a for a in arrays]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        sizes = sorted({f"{a.shape[1]}x{a.shape[0]}" for a in arrays})
        raise DataError(f"images in {str(folder)!r} have different sizes ({', '.join(sizes[:4])}"
                        f"{', ...' if len(sizes) > 4 else ''}); pass --image-size N to centre-crop and resize them "
                        f"all to N x N")
    batch = np.stack(arrays)
    if batch.ndim == 3:  # grayscale: [N, H, W]
        batch = batch[:, None]
    else:
        batch = batch.transpose(0, 3, 1, 2)
    return _to_unit_range(batch), targets, class_names


GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N")


def _to_8_bit(image):
    """High-depth grey images (16-bit PNGs open as I;16 or I) scaled to 8 bits, v -> round(v / 257):
    Pillow's own conversion to L clips every value above 255 to white."""
    if image.mode not in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        return image
    from PIL import Image

    values = np.asarray(image).astype(np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def _center_crop_resize(image, size):
    from PIL import Image

    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)


def _to_unit_range(uint8_batch):
    return torch.from_numpy(np.ascontiguousarray(uint8_batch)).float().div_(127.5).sub_(1.0)


def _is_cifar(folder):
    return any(os.path.exists(os.path.join(folder, name)) for name in CIFAR_TRAIN + CIFAR_TEST)


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR-10's batches are pickles; load them allowing numpy arrays only, never other code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")


def _cifar(folder, split):
    names = CIFAR_TRAIN if split == "train" else CIFAR_TEST
    batches, targets = [], []
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise DataError(f"CIFAR-10 folder {str(folder)!r} lacks {name!r} (expected data_batch_1..5 "
                            f"and test_batch from cifar-10-python.tar.gz)")
        try:
            with open(path, "rb") as f:
                entry = _CifarUnpickler(f, encoding="bytes").load()
            data = np.asarray(entry[b"data"], dtype=np.uint8)
            batch_labels = np.asarray(entry.get(b"labels", []), dtype=np.int64)
        except Exception as error:  # truncated or foreign file: say which one
            raise DataError(f"cannot read CIFAR-10 batch {path!r}: {type(error).__name__}: {error}") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"CIFAR-10 batch {path!r} has data of shape {data.shape}, expected [N, 3072]")
        batches.append(data.reshape(-1, 3, 32, 32))
        targets.append(batch_labels if len(batch_labels) == len(data) else None)
    labels = None if any(t is None for t in targets) else torch.from_numpy(np.concatenate(targets))
    return _to_unit_range(np.concatenate(batches)), labels


def _cifar_class_names(folder, labels):
    """CIFAR-10's class names from ``batches.meta`` (label_names), else "0" .. "9"."""
    if labels is None:
        raise DataError(f"the CIFAR-10 batches in {str(folder)!r} hold no labels (b'labels'); train without "
                        f"--class-cond")
    names = None
    path = os.path.join(folder, "batches.meta")
    if os.path.exists(path):
        try:
            with open(path, "rb") as f:
                names = [bytes(n).decode() for n in _CifarUnpickler(f, encoding="bytes").load()[b"label_names"]]
        except Exception as error:  # a foreign or truncated file: say which one
            raise DataError(f"cannot read CIFAR-10 class names {path!r}: {type(error).__name__}: {error}") from None
    count = max(10, int(labels.max()) + 1)
    if names is None or len(names) < count:
        names = [str(i) for i in range(count)]
    return names


def _resize(images, image_size, channels):
    if channels is not None and images.shape[1] != channels:
        if channels == 1:
            images = images.mean(dim=1, keepdim=True)
        elif channels == 3 and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1).contiguous()
        else:
            raise DataError(f"cannot convert {images.shape[1]}-channel images to {channels} channels")
    if image_size is not None and images.shape[-1] != image_size:
        images = torch.nn.functional.interpolate(images, size=(image_size, image_size), mode="bilinear",
                                                 antialias=True, align_corners=False).clamp_(-1, 1)
    return images.contiguous()


def mix_seed(*values):
    """A 63-bit seed from integers (splitmix64 rounds): distinct (seed, step, rank) never collide
    in practice and neighbouring inputs give unrelated streams."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (int(value) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 29
    return state & 0x7FFFFFFFFFFFFFFF


class StepSampler:
    """The indices of the global batch at a step: a pure function of (seed, step).

    Position p of the stream (p = step * batch_size + i) is element p % N of epoch p // N, an
    epoch being a permutation drawn from (seed, epoch). Each rank takes its contiguous slice of
    the global batch, so the union over ranks is the same whatever the number of ranks.
    """

    def __init__(self, num_items, batch_size, seed, rank=0, world_size=1):
        if num_items < 1:
            raise DataError("the dataset is empty")
        if batch_size % world_size:
            raise DataError(f"--batch-size {batch_size} must be divisible by the number of processes "
                            f"({world_size}): each rank takes batch_size / world_size samples")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self._epoch, self._perm = None, None

    def _permutation(self, epoch):
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.num_items, generator=generator)
        return self._perm

    def indices(self, step):
        per_rank = self.batch_size // self.world_size
        start = step * self.batch_size + self.rank * per_rank
        pieces = []
        while per_rank:  # a batch spans at most a few epochs: take each epoch's run in one slice
            epoch, offset = divmod(start, self.num_items)
            take = min(per_rank, self.num_items - offset)
            pieces.append(self._permutation(epoch)[offset:offset + take])
            start, per_rank = start + take, per_rank - take
        return torch.cat(pieces)
