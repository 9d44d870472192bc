"""Training: exact resume, checkpoints, EMA, mixed precision, divergence, data loading."""

import os
import pickle

import numpy as np
import pytest
import torch

from ddpm_fast import checkpoint as ckpt
from ddpm_fast.data import DataError, StepSampler, load_dataset
from ddpm_fast.ema import EMA
from ddpm_fast.train import ConfigError, TrainingDiverged, train

# A few steps of the digits model with a short schedule: seconds on a CPU.
FAST = dict(batch_size=16, timesteps=50, sample_every=0, warmup=3, ema_decay=0.9, lr=1e-3, progress=False,
            device="cpu")


def _weights_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- data order

def test_step_sampler_is_a_function_of_seed_and_step():
    a, b = StepSampler(10, 4, seed=3), StepSampler(10, 4, seed=3)
    steps = [5, 0, 2, 9, 1]  # any visiting order gives the same batches
    assert all(torch.equal(a.indices(s), b.indices(s)) for s in steps)
    # Each epoch (10 positions) visits every item once, and batches straddle epoch ends.
    stream = torch.cat([a.indices(s) for s in range(5)])  # 20 positions = 2 epochs
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:])  # a new permutation per epoch
    assert not torch.equal(StepSampler(10, 4, seed=4).indices(0), a.indices(0))
    # Ranks take disjoint slices whose union is the single-process batch.
    ranks = [StepSampler(10, 4, seed=3, rank=r, world_size=2).indices(7) for r in (0, 1)]
    assert torch.equal(torch.cat(ranks), a.indices(7))


def test_batch_size_must_divide_across_ranks():
    with pytest.raises(DataError, match="divisible by the number of processes"):
        StepSampler(10, 5, seed=0, rank=0, world_size=2)


# ---------------------------------------------------------------- resume and checkpoints

def test_resume_gives_the_same_weights_bit_for_bit(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(out=str(whole), steps=6, **FAST)
    train(out=str(split), steps=4, **FAST)
    at_four = ckpt.load(split / "checkpoint.pt")
    result = train(out=str(split), steps=6, resume="auto", **FAST)
    assert result["step"] == 6
    a, b = ckpt.load(whole / "checkpoint.pt"), ckpt.load(split / "checkpoint.pt")
    assert a["step"] == b["step"] == 6
    assert _weights_equal(a["model"], b["model"]) and _weights_equal(a["ema"], b["ema"])
    assert not _weights_equal(a["model"], at_four["model"])  # the last two steps did change the weights
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)


def test_checkpoint_contents_load_with_weights_only(tmp_path):
    train(out=str(tmp_path), steps=2, **FAST)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert {"model", "ema", "optimizer", "scaler", "step", "rng", "config"} <= set(state)
    assert state["step"] == 2
    assert state["config"]["model"]["in_channels"] == 1 and state["config"]["diffusion"]["num_timesteps"] == 50
    assert {"torch", "numpy", "python"} <= set(state["rng"])
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left behind


def test_rng_states_round_trip():
    import random

    states = ckpt.rng_states()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_states(states)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_interrupted_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt.save({"config": {}, "step": 1}, path)
    before = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save({"config": {}, "step": 2}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    train(out=str(tmp_path), steps=1, **FAST)
    data = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="cut.pt.*truncated"):
        ckpt.load(tmp_path / "cut.pt")
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load(tmp_path / "missing.pt")


def test_resume_with_another_config_is_refused(tmp_path):
    train(out=str(tmp_path), steps=1, **FAST)
    with pytest.raises(ckpt.CheckpointError, match="another configuration.*--timesteps 100"):
        train(out=str(tmp_path), steps=2, resume="auto", **dict(FAST, timesteps=100))


def test_resume_keeps_the_network_of_the_checkpoint(tmp_path, monkeypatch):
    from ddpm_fast.nn import UNet

    train(out=str(tmp_path), steps=1, **FAST)
    built = ckpt.load(tmp_path / "checkpoint.pt")["config"]["model"]
    # The preset changes later (another width): resuming still builds the checkpoint's network.
    monkeypatch.setitem(UNet.PRESETS, "digits", dict(UNet.PRESETS["digits"], ch=64))
    train(out=str(tmp_path), steps=2, resume="auto", **FAST)
    assert ckpt.load(tmp_path / "checkpoint.pt")["config"]["model"] == built


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from ddpm_fast.diffusion import GaussianDiffusion

    real = GaussianDiffusion.p_losses
    calls = []

    def diverging(self, *args, **kwargs):
        calls.append(1)
        loss = real(self, *args, **kwargs)
        return loss * float("nan") if len(calls) >= 4 else loss

    monkeypatch.setattr(GaussianDiffusion, "p_losses", diverging)
    with pytest.raises(TrainingDiverged) as info:
        train(out=str(tmp_path), steps=6, ckpt_every=2, **FAST)
    message = str(info.value)
    assert "at step 4" in message and "--lr" in message and "intact" in message
    assert ckpt.load(tmp_path / "checkpoint.pt")["step"] == 2


# ---------------------------------------------------------------- EMA and precision

def test_ema_update_follows_the_formula():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.99)
    old = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=1000)
    d = min(0.99, 1001 / 1010)
    torch.testing.assert_close(ema.shadow["weight"], d * old["weight"] + (1 - d) * model.weight, rtol=1e-6, atol=1e-7)
    assert ema.decay_at(0) == pytest.approx(0.1)  # warm-up: early steps follow the weights closely
    target = torch.nn.Linear(3, 2)
    ema.copy_to(target)
    assert torch.equal(target.weight, ema.shadow["weight"])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, precision):
    result = train(out=str(tmp_path), steps=2, precision=precision, **FAST)
    assert np.isfinite(result["loss"])
    state = ckpt.load(tmp_path / "checkpoint.pt")
    assert all(v.dtype == torch.float32 for v in state["model"].values())  # master weights stay fp32
    if precision == "fp16":
        assert state["scaler"]["scale"] > 0  # the GradScaler's state is saved


def test_bad_option_values_are_named():
    with pytest.raises(ConfigError, match="--precision"):
        train(precision="fp8", **FAST)
    with pytest.raises(ConfigError, match="--steps"):
        train(steps=0, **FAST)


# ---------------------------------------------------------------- data sources

def test_digits_split_is_disjoint_and_in_range():
    train_images, test_images = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert train_images.shape[1:] == (1, 8, 8) and len(train_images) + len(test_images) == 1797
    assert train_images.min() >= -1 and train_images.max() <= 1
    train_set = {tuple(x.flatten().tolist()) for x in train_images}
    overlap = sum(tuple(x.flatten().tolist()) in train_set for x in test_images)
    assert overlap < len(test_images) // 10  # digits has a few exact duplicates, nothing more


def _write_images(folder, n, size=(12, 10), mode="RGB"):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"img{i}.png")


def test_image_folder_loads_and_resizes(tmp_path):
    _write_images(tmp_path / "imgs" / "sub", 10)
    images = load_dataset(str(tmp_path / "imgs"), "train", image_size=8)
    assert images.shape == (9, 3, 8, 8) and images.min() >= -1 and images.max() <= 1
    gray = load_dataset(str(tmp_path / "imgs"), "test", image_size=8, channels=1)
    assert gray.shape == (1, 1, 8, 8)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        load_dataset(str(tmp_path / "empty"))
    _write_images(tmp_path / "bad", 3)
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        load_dataset(str(tmp_path / "bad"))


def test_cifar_batches_load_and_foreign_pickles_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
        with open(tmp_path / name, "wb") as f:
            pickle.dump(batch, f)
    images = load_dataset(str(tmp_path), "train")
    assert images.shape == (20, 3, 32, 32)
    with open(tmp_path / "data_batch_1", "rb") as f:
        first = pickle.load(f)[b"data"][0]
    expected = torch.from_numpy(first.reshape(3, 32, 32).astype(np.float32)) / 127.5 - 1
    torch.testing.assert_close(images[0], expected)
    assert load_dataset(str(tmp_path), "test").shape == (4, 3, 32, 32)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil()}, f)
    with pytest.raises(DataError, match="cannot read CIFAR-10 batch .*not allowed"):
        load_dataset(str(tmp_path), "test")


# ---------------------------------------------------------------- class-conditional training

def test_class_conditional_resume_gives_the_same_weights_bit_for_bit(tmp_path):
    # A high drop rate, so that which labels are dropped matters at every step.
    options = dict(FAST, class_cond=True, cond_drop_prob=0.5)
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(out=str(whole), steps=6, **options)
    train(out=str(split), steps=4, **options)
    result = train(out=str(split), steps=6, resume="auto", **dict(options, class_cond=None))  # from the checkpoint
    assert result["step"] == 6
    a, b = ckpt.load(whole / "checkpoint.pt"), ckpt.load(split / "checkpoint.pt")
    assert _weights_equal(a["model"], b["model"]) and _weights_equal(a["ema"], b["ema"])
    assert "class_embed.weight" in a["model"] and a["config"]["class_names"] == [str(i) for i in range(10)]
    # Another drop rate gives other weights: the labels did reach the model, dropped as asked.
    train(out=str(tmp_path / "other"), steps=6, **dict(options, cond_drop_prob=0.0))
    assert not _weights_equal(ckpt.load(tmp_path / "other" / "checkpoint.pt")["model"], a["model"])


def test_resume_refuses_to_change_class_conditioning(tmp_path):
    train(out=str(tmp_path), steps=1, **FAST)
    with pytest.raises(ckpt.CheckpointError, match="another configuration.*--class-cond True"):
        train(out=str(tmp_path), steps=2, resume="auto", class_cond=True, **FAST)


def test_labels_follow_their_images():
    from sklearn.datasets import load_digits

    digits = load_digits()
    for split in ("train", "test"):
        images, labels, names = load_dataset("digits", split, labels=True)
        assert torch.equal(images, load_dataset("digits", split)) and names == [str(i) for i in range(10)]
        assert labels.dtype == torch.long and len(labels) == len(images)
        # Each image's label is the label of that image in scikit-learn's arrays.
        pixels = torch.from_numpy(digits.images.reshape(len(digits.images), -1).astype(np.float32) / 8 - 1)
        for image, label in zip(images[:50], labels[:50]):
            index = (pixels == image.flatten()).all(dim=1).nonzero()[:, 0]
            assert label.item() in digits.target[index.numpy()]


def test_image_folder_classes_are_the_sorted_subfolders(tmp_path):
    _write_images(tmp_path / "imgs" / "b_second", 6, size=(8, 8))
    _write_images(tmp_path / "imgs" / "a_first" / "nested", 4, size=(8, 8))  # searched recursively
    images, labels, names = load_dataset(str(tmp_path / "imgs"), "train", labels=True)
    test_images, test_labels, _ = load_dataset(str(tmp_path / "imgs"), "test", labels=True)
    assert names == ["a_first", "b_second"] and len(labels) == 9 and len(test_labels) == 1
    assert torch.equal(images, load_dataset(str(tmp_path / "imgs"), "train"))  # the same split as without labels
    assert sorted(torch.cat([labels, test_labels]).tolist()) == [0] * 4 + [1] * 6
    (tmp_path / "imgs" / "c_empty").mkdir()
    with pytest.raises(DataError, match="class folder .*c_empty' holds no images"):
        load_dataset(str(tmp_path / "imgs"), labels=True)
    _write_images(tmp_path / "flat", 3, size=(8, 8))
    with pytest.raises(DataError, match="reads the classes from the subfolders .*3 image\\(s\\) lie in the folder"):
        load_dataset(str(tmp_path / "flat"), labels=True)
    assert load_dataset(str(tmp_path / "flat")).shape[0] == 2  # without labels, as before
