"""Sample quality of a model: N samples -> features -> FID, KID, precision and recall against a
reference whose statistics are computed once and cached on disk.

Convention (docs/metrics.md): samples in [-1, 1] are quantised to uint8 exactly as saved images
are (``round((x + 1) * 127.5)``), so scoring samples in memory and scoring their PNG files give
the same numbers; the feature network sees uint8 images. Statistics are float64. KID uses
subsets of min(1000, N, N_ref) features (100 subsets, seed 2020); precision and recall (k = 3)
compare the N samples with N reference images drawn without replacement (seed 0), all of them
when the reference is smaller.

The reference cache lives in ``$XDG_CACHE_HOME/ddpm_fast`` (``~/.cache/ddpm_fast``), one
``.npz`` per (data, feature network) with pytorch-fid's ``mu`` and ``sigma`` and the
``features`` themselves (for KID and precision/recall); its name hashes the data's identity
(the source name, or the folder's path and every file's name, size and mtime) and the feature
network's name and weights.
"""

import hashlib
import json
import os
import time

import numpy as np
import torch

from .scores import (MetricsError, feature_statistics, frechet_distance, kernel_inception_distance, load_statistics,
                     precision_recall, save_statistics)

FEATURES = ("inception", "digits")
KID_SUBSETS, KID_SUBSET_SIZE, PR_K = 100, 1000, 3


def cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ddpm_fast")


def to_uint8(images):
    """[N, C, H, W] floats in [-1, 1] -> uint8 [N, C, H, W], rounded as saved images are."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def default_features(channels, image_size):
    """'digits' for 8x8 grey images (the digits model), 'inception' for anything else."""
    return "digits" if (channels, image_size) == (1, 8) else "inception"


def feature_network(name, device="cpu", inception_weights=None, download=False):
    if name == "digits":
        from .digits import DigitsFeatures

        return DigitsFeatures().to(device)
    if name == "inception":
        from .inception import InceptionFeatures

        return InceptionFeatures(weights=inception_weights, download=download).to(device)
    raise MetricsError(f"features must be one of {list(FEATURES)}, got {name!r}")


def network_identity(net):
    from .digits import file_sha256

    path = getattr(net, "weights_path", None)
    return {"network": net.name, "weights_sha256": file_sha256(path) if path else None}


@torch.no_grad()
def extract_features(net, images, batch_size=200, progress=False, desc="features"):
    """float64 numpy [N, D] features of uint8 images [N, C, H, W] (or float images in [-1, 1])."""
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    if len(images) == 0:
        raise MetricsError("no images to extract features from")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(images), desc=desc, unit="img", dynamic_ncols=True, leave=False)
    out = []
    for start in range(0, len(images), batch_size):
        out.append(net(images[start:start + batch_size]).double().cpu())
        if bar is not None:
            bar.update(len(out[-1]))
    if bar is not None:
        bar.close()
    return torch.cat(out).numpy()


# ---------------------------------------------------------------- the reference

def reference_images(source):
    """uint8 [N, C, H, W] of a reference: 'digits' (the training split the model learned from),
    a folder of CIFAR-10 batches (its training batches) or a folder of images (all of them)."""
    from ..data import _image_folder, _is_cifar, load_dataset

    if source == "digits" or (os.path.isdir(source) and _is_cifar(source)):
        return to_uint8(load_dataset(source, "train"))
    if not os.path.isdir(source):
        raise MetricsError(f"reference {source!r} is neither 'digits', a folder of images or CIFAR-10 batches, "
                           f"nor a statistics .npz file")
    return to_uint8(_image_folder(source, None, None))


def data_identity(source):
    if source == "digits":
        import sklearn

        return {"data": "digits", "split": "train", "scikit-learn": sklearn.__version__}
    folder = os.path.abspath(source)
    digest = hashlib.sha256()
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            stat = os.stat(path)
            digest.update(f"{os.path.relpath(path, folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"data": folder, "files_sha256": digest.hexdigest()}


def reference_statistics(ref, net, batch_size=200, progress=False, use_cache=True):
    """{"mu", "sigma", "features" (or absent for a stats file), "source", "cache"} of a reference."""
    if str(ref).endswith(".npz"):
        if not os.path.isfile(ref):
            raise MetricsError(f"reference statistics file {ref!r} does not exist")
        stats = load_statistics(ref)
        if stats["mu"].shape != (net.dims,):
            raise MetricsError(f"reference statistics {ref!r} have {stats['mu'].shape[0]} dimensions, the "
                               f"{net.name} features {net.dims}: they come from another feature network")
        return dict(stats, source=os.path.abspath(ref), cache=None)
    identity = {**data_identity(ref), **network_identity(net), "format": 1}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    path = os.path.join(cache_dir(), f"ref-{net.name}-{key}.npz")
    if use_cache and os.path.isfile(path):
        try:
            return dict(load_statistics(path), source=ref, cache=path)
        except MetricsError:
            pass  # a damaged cache entry: compute it again
    features = extract_features(net, reference_images(ref), batch_size=batch_size, progress=progress,
                                desc=f"reference {net.name} features")
    mu, sigma = feature_statistics(features)
    if use_cache:
        save_statistics(path, mu, sigma, features=features.astype(np.float32),
                        identity=np.array(json.dumps(identity, sort_keys=True)))
    return {"mu": mu, "sigma": sigma, "features": features, "source": ref, "cache": path if use_cache else None}


# ---------------------------------------------------------------- the scores

def raise_on_every_rank(failure, dist_info):
    """Raises the main rank's set-up error (or None: nothing) on every rank, so that no rank
    waits forever in a collective the main rank will never join."""
    if dist_info is not None and dist_info.world_size > 1:
        import torch.distributed as dist

        message = [None if failure is None else str(failure)]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None and failure is None:
            failure = MetricsError(message[0])
    if failure is not None:
        raise failure


def compute_metrics(features, reference, seed=0):
    """{"fid", "kid_mean", "kid_std", "precision", "recall", sizes}: features [N, D] of the samples
    against a reference from :func:`reference_statistics`. KID, precision and recall are None
    when the reference is a statistics file without features."""
    mu, sigma = feature_statistics(features)
    result = {"fid": frechet_distance(mu, sigma, reference["mu"], reference["sigma"]), "n": len(features)}
    real = reference.get("features")
    result.update(kid_mean=None, kid_std=None, precision=None, recall=None, kid_subsets=None, kid_subset_size=None,
                  pr_k=PR_K, n_real=None if real is None else len(real))
    if real is None:
        return result
    real = np.asarray(real, dtype=np.float64)
    size = min(KID_SUBSET_SIZE, len(features), len(real))
    result["kid_mean"], result["kid_std"] = kernel_inception_distance(features, real, KID_SUBSETS, size)
    result.update(kid_subsets=KID_SUBSETS, kid_subset_size=size)
    if len(real) > len(features):
        real = real[np.random.RandomState(seed).choice(len(real), len(features), replace=False)]
    result["precision"], result["recall"] = precision_recall(features, real, k=PR_K)
    result["n_real_pr"] = len(real)
    return result


def evaluate(model, diffusion, n, *, features=None, ref="digits", batch_size=64, feature_batch_size=200,
             inception_weights=None, download=False, dist_info=None, progress=False, net=None, reference=None,
             **sampling):
    """Draws n samples with ``ddpm_fast.train.generate`` (sharded over ranks), scores them.

    sampling: generate's options (sampler, steps, eta, seed, clip, ...). Returns the metrics
    dict on the main rank, None on the others. ``net`` and ``reference`` skip their set-up
    (the training loop passes them, computed once).
    """
    from ..train import generate

    from ..data import DataError

    main = dist_info is None or dist_info.main
    config = model.config
    features = features or default_features(config["in_channels"], config["image_size"])
    failure = None
    try:  # on the main rank, fail before sampling when the weights or the reference are missing
        if main and net is None:
            net = feature_network(features, device=next(model.parameters()).device,
                                  inception_weights=inception_weights, download=download)
        if main and reference is None:
            reference = reference_statistics(ref, net, batch_size=feature_batch_size, progress=progress)
    except (MetricsError, DataError) as error:
        failure = error
    raise_on_every_rank(failure, dist_info)
    start = time.perf_counter()
    samples = generate(model, diffusion, n, batch_size=batch_size, dist_info=dist_info, progress=progress and main,
                       **sampling)
    sampling_seconds = time.perf_counter() - start
    if not main:
        return None
    sample_features = extract_features(net, to_uint8(samples), batch_size=feature_batch_size, progress=progress,
                                       desc=f"sample {net.name} features")
    result = compute_metrics(sample_features, reference)
    result.update(features=features, ref=str(ref), reference_cache=reference.get("cache"), batch_size=batch_size,
                  sampling_seconds=round(sampling_seconds, 3),
                  **{k: v for k, v in sampling.items() if isinstance(v, (int, float, str, bool, type(None)))})
    return result


def format_table(result):
    def number(value, digits=4):
        return "n/a" if value is None else f"{value:.{digits}f}"

    kid = "n/a" if result["kid_mean"] is None else f"{result['kid_mean']:.6f} ± {result['kid_std']:.6f}"
    rows = [("FID" + (" (digits features)" if result["features"] == "digits" else ""), number(result["fid"])),
            (f"KID (subsets of {result['kid_subset_size']})" if result["kid_subset_size"] else "KID", kid),
            (f"precision (k={result['pr_k']})", number(result["precision"])),
            (f"recall (k={result['pr_k']})", number(result["recall"]))]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
