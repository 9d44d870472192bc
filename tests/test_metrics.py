"""Sample-quality metrics: the formulas against pytorch-fid's and torch-fidelity's own code on
the same features, the Inception port against torch-fidelity's network on random weights, the
digits feature network on real and generated digits, and the reference cache.

pytorch-fid and torch-fidelity import torchvision in their package ``__init__``, which cannot be
imported beside a CPU build of torch here; the tests load the single module files they compare
against from the installed distributions, with torchvision (never used by those functions)
stubbed out. Without the distributions those tests skip and say so; CI installs them (README).
"""

import importlib.util
import os
import sys
import types

import numpy as np
import pytest
import torch

from ddpm_fast import metrics
from ddpm_fast.metrics import evaluation as ev
from ddpm_fast.metrics.scores import MetricsError

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is ever downloaded by these tests


def _package_dir(name):
    spec = importlib.util.find_spec(name)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{name} is not installed (pip install --no-deps torch-fidelity pytorch-fid)")
    return list(spec.submodule_search_locations)[0]


def _load_modules(monkeypatch, package, modules, stubs):
    """Loads ``package.<module>`` files without running ``package/__init__.py``: a bare package
    module pointing at the installed folder, with ``stubs`` (name -> attributes) in sys.modules."""
    folder = _package_dir(package)
    fake = types.ModuleType(package)
    fake.__path__ = [folder]
    monkeypatch.setitem(sys.modules, package, fake)
    for name, attributes in stubs.items():
        stub = types.ModuleType(name)
        stub.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, name, stub)
    loaded = []
    for module in modules:
        full = f"{package}.{module}"
        spec = importlib.util.spec_from_file_location(full, os.path.join(folder, module + ".py"))
        value = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, full, value)
        spec.loader.exec_module(value)
        loaded.append(value)
    return loaded


@pytest.fixture
def pytorch_fid(monkeypatch):
    inception = types.SimpleNamespace(BLOCK_INDEX_BY_DIM={2048: 3}, DEFAULT_BLOCK_INDEX=3)  # its CLI's defaults
    stubs = {"torchvision": {}, "torchvision.transforms": {}, "pytorch_fid.inception": {"InceptionV3": inception}}
    (fid_score,) = _load_modules(monkeypatch, "pytorch_fid", ["fid_score"], stubs)
    return fid_score


@pytest.fixture
def torch_fidelity(monkeypatch):
    utils = {name: None for name in ("create_feature_extractor", "extract_featuresdict_from_input_id_cached",
                                     "resolve_feature_extractor", "resolve_feature_layer_for_metric")}
    names = ["defaults", "deprecations", "helpers", "interpolate_compat_tensorflow", "feature_extractor_base",
             "feature_extractor_inceptionv3", "metric_kid", "metric_prc"]
    modules = _load_modules(monkeypatch, "torch_fidelity", names, {"torch_fidelity.utils": utils})
    return types.SimpleNamespace(**dict(zip(names, modules)))


def _random_features(n, d, seed, scale=1.0, shift=0.0):
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((d, d)) / d ** 0.5
    return (rng.standard_normal((n, d)) @ mixing) * scale + shift


# ---------------------------------------------------------------- Fréchet distance

@pytest.mark.parametrize("n, d", [(500, 16), (400, 64), (3000, 256)])
def test_frechet_distance_equals_pytorch_fid(pytorch_fid, n, d):
    a, b = _random_features(n, d, 0), _random_features(n, d, 1, scale=1.2, shift=0.05)
    (mu1, s1), (mu2, s2) = metrics.feature_statistics(a), metrics.feature_statistics(b)
    ours = metrics.frechet_distance(mu1, s1, mu2, s2)
    theirs = float(pytorch_fid.calculate_frechet_distance(mu1, s1, mu2, s2))
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8 * np.trace(s1))


@pytest.mark.slow
def test_frechet_distance_equals_pytorch_fid_at_2048_dimensions(pytorch_fid):
    # Inception's dimension, with more samples than dimensions as a real FID has (~30 s: scipy's sqrtm)
    a, b = _random_features(2500, 2048, 2), _random_features(2500, 2048, 3, scale=0.9, shift=0.02)
    (mu1, s1), (mu2, s2) = metrics.feature_statistics(a), metrics.feature_statistics(b)
    ours = metrics.frechet_distance(mu1, s1, mu2, s2)
    theirs = float(pytorch_fid.calculate_frechet_distance(mu1, s1, mu2, s2))
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_frechet_distance_with_near_singular_covariances(pytorch_fid):
    # Fewer samples than dimensions (rank 40 of 96) and a constant feature: singular covariances.
    a, b = _random_features(41, 96, 4), _random_features(41, 96, 5, shift=0.3)
    a[:, 0] = b[:, 0] = 0.5
    (mu1, s1), (mu2, s2) = metrics.feature_statistics(a), metrics.feature_statistics(b)
    ours = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(ours) and ours > 0
    theirs = float(pytorch_fid.calculate_frechet_distance(mu1, s1, mu2, s2))
    assert ours == pytest.approx(theirs, rel=1e-5)
    # Exactly identical singular statistics: zero, not NaN or a complex value.
    assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-7 * np.trace(s1))


def test_frechet_distance_refuses_mismatched_statistics():
    with pytest.raises(MetricsError, match="shapes do not match"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(MetricsError, match="NaN"):
        metrics.frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))


def test_statistics_file_is_pytorch_fid_layout(tmp_path):
    mu, sigma = metrics.feature_statistics(_random_features(50, 8, 6))
    path = tmp_path / "stats.npz"
    metrics.save_statistics(path, mu, sigma)
    with np.load(path) as data:
        assert sorted(data.files) == ["mu", "sigma"] and data["sigma"].dtype == np.float64
    np.testing.assert_array_equal(metrics.load_statistics(path)["mu"], mu)
    np.savez(tmp_path / "bad.npz", m=mu)
    with pytest.raises(MetricsError, match="expected 'mu' and 'sigma'"):
        metrics.load_statistics(tmp_path / "bad.npz")


# ---------------------------------------------------------------- KID

@pytest.mark.parametrize("subsets, size", [(10, 100), (5, 200)])
def test_kid_equals_torch_fidelity(torch_fidelity, subsets, size):
    a, b = _random_features(300, 32, 7), _random_features(250, 32, 8, scale=1.1, shift=0.1)
    ours = metrics.kernel_inception_distance(a, b, subsets=subsets, subset_size=size)
    theirs = torch_fidelity.metric_kid.kid_features_to_metric(
        torch.from_numpy(a), torch.from_numpy(b), kid_subsets=subsets, kid_subset_size=size, verbose=False)
    assert ours[0] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-9, abs=1e-12)
    assert ours[1] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-9, abs=1e-12)
    assert ours[0] > 0


def test_kid_of_one_distribution_is_near_zero_and_refuses_large_subsets():
    both = _random_features(800, 16, 9)  # one distribution, two disjoint halves
    a, b = both[:400], both[400:]
    mean, std = metrics.kernel_inception_distance(a, b, subsets=20, subset_size=200)
    assert abs(mean) < 3 * std + 1e-3
    with pytest.raises(MetricsError, match="larger than the sets"):
        metrics.kernel_inception_distance(a[:50], b, subset_size=100)


# ---------------------------------------------------------------- precision and recall

def _brute_force_precision_recall(fake, real, k):
    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]

    def coverage(queries, support):
        d = np.sqrt(((queries[:, None] - support[None]) ** 2).sum(-1))
        return float((d <= radii(support)[None]).any(1).mean())

    return coverage(fake, real), coverage(real, fake)


def test_precision_recall_against_brute_force_and_torch_fidelity(torch_fidelity):
    fake, real = _random_features(150, 10, 10, shift=0.4), _random_features(120, 10, 11)
    ours = metrics.precision_recall(fake, real, k=3, chunk=32)
    assert ours == pytest.approx(_brute_force_precision_recall(fake, real, 3), abs=1e-12)
    theirs = torch_fidelity.metric_prc.prc_features_to_metric(torch.from_numpy(fake), torch.from_numpy(real),
                                                              prc_neighborhood=3, verbose=False)
    assert ours == pytest.approx((theirs["precision"], theirs["recall"]), abs=1e-6)  # theirs: a float32 mean
    assert 0.1 < ours[0] < 0.95 and 0.1 < ours[1] < 0.95  # not a degenerate case


def test_precision_recall_on_hand_made_sets():
    real = _random_features(60, 5, 12)
    assert metrics.precision_recall(real, real.copy()) == (1.0, 1.0)
    assert metrics.precision_recall(real + 1000.0, real) == (0.0, 0.0)
    # Samples collapsed on a few real points: precise, but recall only covers those points' balls.
    collapsed = np.repeat(real[:4], 15, axis=0) + 1e-9 * _random_features(60, 5, 13)
    precision, recall = metrics.precision_recall(collapsed, real)
    assert precision == 1.0 and recall < 0.2


# ---------------------------------------------------------------- Inception

def test_tf1_resize_equals_torch_fidelity(torch_fidelity):
    x = torch.randint(0, 256, (2, 3, 8, 11), generator=torch.Generator().manual_seed(0)).float()
    ours = metrics.resize_bilinear_tf1(x, (299, 299))
    theirs = torch_fidelity.interpolate_compat_tensorflow.interpolate_bilinear_2d_like_tensorflow1x(
        x, size=(299, 299), align_corners=False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A random state dict in the FID weights layout (batch-norm statistics included), saved
    under torch-fidelity's file name."""
    return _random_inception_state(tmp_path_factory.mktemp("inception"))


def _random_inception_state(tmp_path, seed=0):
    shapes = _inception_shapes()
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=generator)
        elif key.endswith("running_mean"):
            state[key] = 0.1 * torch.randn(shape, generator=generator)
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0)
        elif key.endswith("bn.weight"):
            state[key] = 1 + 0.2 * torch.randn(shape, generator=generator)
        elif key.endswith("bias"):
            state[key] = 0.1 * torch.randn(shape, generator=generator)
        else:  # conv / fc weights, scaled to keep activations of order one
            fan_in = int(np.prod(shape[1:]))
            state[key] = torch.randn(shape, generator=generator) * (2.0 / fan_in) ** 0.5
    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    return state, path


def _inception_shapes():
    class Skeleton(metrics.InceptionFeatures):
        def load_state_dict(self, state, strict=True):  # the layers only, no weights
            return None

    return {key: value.shape for key, value in Skeleton(state_dict={}).state_dict().items()}


@pytest.mark.slow
def test_inception_features_equal_torch_fidelity(torch_fidelity, inception_weights):
    state, path = inception_weights
    theirs_net = torch_fidelity.feature_extractor_inceptionv3.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    ours_net = metrics.InceptionFeatures(weights=path)
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    images[1] = images[1, :1]  # a grey image among them
    with torch.no_grad():
        (theirs,) = theirs_net(images)
    ours = ours_net(images)
    assert ours.shape == (2, 2048) and ours.std() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
    # A grey [N, 1, H, W] image is the same as its 3-channel copy.
    torch.testing.assert_close(ours_net(images[1:, :1]), ours[1:], rtol=1e-5, atol=1e-5)
    # pytorch-fid's wrapper layout ("blocks.I.J.") loads the same weights.
    wrapper = {}
    for key, value in state.items():
        for block, names in enumerate(metrics.inception._PYTORCH_FID_BLOCKS):
            for index, name in enumerate(names):
                if key.startswith(name + "."):
                    wrapper[f"blocks.{block}.{index}.{key[len(name) + 1:]}"] = value
    wrapper.update({k: v for k, v in state.items() if k.startswith("fc.")})
    from_wrapper = metrics.InceptionFeatures(state_dict=wrapper).state_dict()
    assert all(torch.equal(from_wrapper[k], v) for k, v in ours_net.state_dict().items())


def test_inception_weights_are_never_downloaded_unasked(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("download attempted"))
    with pytest.raises(MetricsError) as error:
        metrics.InceptionFeatures()
    message = str(error.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in message
    assert "weights-inception-2015-12-05-6726825d.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    with pytest.raises(MetricsError):  # offline: not even with download=True
        metrics.InceptionFeatures(download=True)


def test_inception_weights_found_in_the_hub_cache(tmp_path, monkeypatch, inception_weights):
    _, path = inception_weights
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    os.symlink(path, folder / path.name)  # torch-fidelity's name
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    net = metrics.InceptionFeatures()
    assert net.weights_path == str(folder / path.name) and not net.training
    net.train()
    assert not net.training  # never in training mode


# ---------------------------------------------------------------- the digits features

@pytest.fixture(scope="module")
def digits_net():
    return metrics.DigitsFeatures()


def _digits_features(net, split):
    from ddpm_fast.data import load_dataset

    return ev.extract_features(net, load_dataset("digits", split))


def test_digits_feature_network_is_small_and_classifies_held_out_digits(digits_net):
    from ddpm_fast.metrics.digits import shipped_path

    assert os.path.getsize(shipped_path()) < 100_000
    state = torch.load(shipped_path(), weights_only=True)
    assert state["held_out_accuracy"] > 0.95


def test_real_vs_real_digits_fid_is_near_zero_noise_far_above_samples(digits_net):
    from ddpm_fast import checkpoint
    from ddpm_fast.train import generate, load_for_sampling

    train, test = _digits_features(digits_net, "train"), _digits_features(digits_net, "test")
    half = np.random.RandomState(0).permutation(len(train))
    a, b = train[half[:808]], train[half[808:]]
    reference = metrics.feature_statistics(train)

    def fid(features, against=reference):
        return metrics.frechet_distance(*metrics.feature_statistics(features), *against)

    real_vs_real = fid(a, metrics.feature_statistics(b))
    held_out = fid(test)
    uniform = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = ev.extract_features(digits_net, uniform)
    model, diffusion, _ = load_for_sampling(checkpoint.shipped_path(), torch.device("cpu"))
    samples = ev.extract_features(digits_net, generate(model, diffusion, 200, batch_size=200, sampler="dpm++2m",
                                                       steps=10, seed=0))
    print(f"digits FID: training halves {real_vs_real:.3f}, 180 held-out vs train {held_out:.3f}, 200 samples "
          f"{fid(samples):.3f}, 200 uniform-noise images {fid(noise):.3f}")
    assert real_vs_real < 0.5 and real_vs_real < 0.25 * fid(samples)
    assert fid(noise) > 10 * fid(samples)
    # KID and precision/recall tell the same story.
    kid_real, kid_real_std = metrics.kernel_inception_distance(a, b, subsets=20, subset_size=800)
    kid_samples = metrics.kernel_inception_distance(samples, train, subsets=20, subset_size=200)[0]
    kid_noise = metrics.kernel_inception_distance(noise, train, subsets=20, subset_size=200)[0]
    print(f"digits KID: training halves {kid_real:.4f} ± {kid_real_std:.4f}, samples {kid_samples:.4f}, noise "
          f"{kid_noise:.4f}; precision/recall of samples {metrics.precision_recall(samples, a[:200])}, of noise "
          f"{metrics.precision_recall(noise, a[:200])}")
    assert abs(kid_real) < 0.05 * kid_noise and kid_samples < 0.1 * kid_noise
    assert metrics.precision_recall(noise, a[:200])[0] < 0.2
    assert metrics.precision_recall(samples, a[:200])[0] > 0.5


def test_reference_statistics_are_cached(digits_net, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = ev.reference_statistics("digits", digits_net)
    assert first["cache"].startswith(str(tmp_path / "ddpm_fast")) and os.path.isfile(first["cache"])
    assert first["features"].shape == (1617, 64)
    monkeypatch.setattr(ev, "reference_images", lambda source: pytest.fail("recomputed despite the cache"))
    second = ev.reference_statistics("digits", digits_net)
    np.testing.assert_allclose(second["sigma"], first["sigma"])
    # A .npz with mu/sigma only (pytorch-fid's layout) gives the FID alone.
    stats = tmp_path / "stats.npz"
    metrics.save_statistics(stats, first["mu"], first["sigma"])
    only_stats = ev.reference_statistics(str(stats), digits_net)
    result = ev.compute_metrics(first["features"][:300], only_stats)
    assert result["fid"] > 0 and result["kid_mean"] is None and result["precision"] is None
