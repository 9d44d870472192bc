"""The ddpm-fast command line: sample (shipped model), train, eval-bpd, export, info, bad input."""

import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast import checkpoint as ckpt
from ddpm_fast.cli import main

FAST_TRAIN = ["--batch-size", "16", "--timesteps", "50", "--sample-every", "0", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 3-step digits run with T = 50 and a grid written at step 3."""
    out = tmp_path_factory.mktemp("run")
    argv = ["train", "--steps", "3", "--out", str(out), *FAST_TRAIN, "--sample-every", "3", "--sample-n", "4",
            "--sample-steps", "3"]
    assert main(argv) == 0
    return out


def _png(path):
    with Image.open(path) as image:
        image.load()
        return np.asarray(image)


def test_sample_without_arguments_uses_the_shipped_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["sample", "--n", "16"]) == 0
    grid = _png(tmp_path / "samples.png")
    assert grid.ndim == 2 and grid.shape[0] == grid.shape[1] > 4 * 32  # 4 x 4 tiles of 8x8 digits, enlarged
    assert grid.std() > 10  # not a blank image
    assert "wrote 16 samples" in capsys.readouterr().out
    assert os.listdir(tmp_path) == ["samples.png"]  # no temporary files left


def test_shipped_model_is_small_and_loads_weights_only():
    path = ckpt.shipped_path()
    assert os.path.getsize(path) < 1_000_000
    state = torch.load(path, weights_only=True)
    assert set(state) >= {"config", "ema"} and state["config"]["model"]["in_channels"] == 1


def test_shipped_model_is_class_conditional():
    from ddpm_fast.train import load_for_sampling

    model, diffusion, state = load_for_sampling(ckpt.shipped_path(), torch.device("cpu"))
    assert state["config"]["class_names"] == [str(i) for i in range(10)]
    assert model.num_classes == 10 and model.null_class == 10
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([999, 500, 10])
    with torch.no_grad():
        threes, unconditional = model(x, t, y=torch.full((3,), 3)), model(x, t)
    assert threes.shape == unconditional.shape == x.shape and not torch.allclose(threes, unconditional)


def test_train_writes_checkpoint_and_grid(run_dir):
    assert sorted(os.listdir(run_dir)) == ["checkpoint.pt", "samples"]
    assert os.listdir(run_dir / "samples") == ["step_0000003.png"]
    assert ckpt.load(run_dir / "checkpoint.pt")["step"] == 3


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m"])
def test_sample_from_checkpoint_with_npz(run_dir, tmp_path, sampler):
    out, npz = tmp_path / "grid.png", tmp_path / "raw.npz"
    argv = ["sample", "--ckpt", str(run_dir / "checkpoint.pt"), "--n", "5", "--batch-size", "2", "--sampler", sampler,
            "--steps", "4", "--seed", "1", "--out", str(out), "--npz", str(npz), "--device", "cpu"]
    assert main(argv) == 0
    with np.load(npz) as data:
        assert data["arr_0"].shape == (5, 8, 8, 1) and data["arr_0"].dtype == np.uint8
        samples = data["samples"]
    assert samples.shape == (5, 1, 8, 8) and np.isfinite(samples).all() and np.abs(samples).max() <= 1
    # The same seed gives the same samples; another seed, others.
    again = tmp_path / "again.npz"
    argv[argv.index("--npz") + 1] = str(again)
    assert main(argv) == 0
    with np.load(again) as data:
        np.testing.assert_array_equal(data["samples"], samples)
    argv[argv.index("--seed") + 1] = "2"
    assert main(argv) == 0
    with np.load(again) as data:
        assert not np.array_equal(data["samples"], samples)


def test_sample_with_raw_weights_and_export(run_dir, tmp_path):
    small = tmp_path / "small.pt"
    assert main(["export", "--ckpt", str(run_dir / "checkpoint.pt"), "--out", str(small), "--half"]) == 0
    assert os.path.getsize(small) < os.path.getsize(run_dir / "checkpoint.pt") / 4
    assert main(["sample", "--ckpt", str(small), "--n", "2", "--steps", "2", "--out", str(tmp_path / "a.png")]) == 0
    assert main(["sample", "--ckpt", str(run_dir / "checkpoint.pt"), "--no-ema", "--n", "2", "--steps", "2",
                 "--out", str(tmp_path / "b.png")]) == 0
    # An EMA-only file has no raw weights: a clear error, and no grid.
    assert main(["sample", "--ckpt", str(small), "--no-ema", "--out", str(tmp_path / "c.png")]) == 1
    assert not (tmp_path / "c.png").exists()


def test_eval_bpd(run_dir, capsys):
    assert main(["eval-bpd", "--ckpt", str(run_dir / "checkpoint.pt"), "--n", "4", "--batch-size", "2"]) == 0
    line = capsys.readouterr().out.strip()
    bpd = float(line.split()[0])
    assert "bits/dim" in line and "4 test images of digits" in line
    assert 0 < bpd < 20  # an untrained model: far from good, but a finite, positive bound


def test_resume_from_the_command_line(run_dir, tmp_path, capsys):
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "checkpoint.pt").write_bytes((run_dir / "checkpoint.pt").read_bytes())
    assert main(["train", "--resume", str(copy / "checkpoint.pt"), "--steps", "4", "--no-progress"]) == 0
    assert ckpt.load(copy / "checkpoint.pt")["step"] == 4
    assert "trained to step 4" in capsys.readouterr().out


# ---------------------------------------------------------------- eval: FID, KID, precision/recall

def test_eval_writes_the_metrics_as_json(tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "metrics.json"
    argv = ["eval", "--n", "48", "--batch-size", "48", "--sampler", "ddim", "--steps", "4", "--seed", "3",
            "--json", str(out), "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "FID (digits features)" in printed and "precision (k=3)" in printed
    result = json.loads(out.read_text())
    for key in ("fid", "kid_mean", "kid_std", "precision", "recall"):
        assert isinstance(result[key], float) and np.isfinite(result[key]), key
    assert result["fid"] > 0 and 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    assert (result["sampler"], result["steps"], result["seed"], result["n"], result["features"], result["ref"]) == \
        ("ddim", 4, 3, 48, "digits", "digits")
    assert result["kid_subset_size"] == 48 and result["reference_cache"].startswith(str(tmp_path / "cache"))
    # A statistics file as reference: the FID alone, the same number (the same features' statistics).
    from ddpm_fast.metrics import load_statistics, save_statistics

    stats = load_statistics(result["reference_cache"])
    save_statistics(tmp_path / "ref.npz", stats["mu"], stats["sigma"])
    assert main(argv + ["--ref", str(tmp_path / "ref.npz"), "--json", str(tmp_path / "fid.json")]) == 0
    only_fid = json.loads((tmp_path / "fid.json").read_text())
    assert only_fid["fid"] == pytest.approx(result["fid"], rel=1e-9) and only_fid["kid_mean"] is None


def test_eval_errors_say_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    _fails(["eval", "--features", "inception", "--n", "4", "--json", str(tmp_path / "m.json")], capsys,
           "pt_inception-2015-12-05-6726825d.pth", str(tmp_path / "hub" / "checkpoints"))
    assert not (tmp_path / "m.json").exists()
    _fails(["eval", "--pipeline", str(tmp_path), "--n", "4"], capsys, "--ref")
    _fails(["eval", "--n", "4", "--ref", str(tmp_path / "missing.npz")], capsys, "does not exist")


def test_train_eval_every_logs_the_metrics(tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["train", "--steps", "2", "--out", str(out), *FAST_TRAIN, "--eval-every", "1", "--eval-n", "16",
                 "--sample-steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "step 1: loss" in printed and "step 2: loss" in printed and "FID (digits, n=16)" in printed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["fid"]) and r["precision"] is not None and r["loss"] > 0 for r in records)
    assert len(os.listdir(tmp_path / "cache" / "ddpm_fast")) == 1  # the reference statistics, computed once
    _fails(["train", "--steps", "1", "--out", str(tmp_path / "x"), *FAST_TRAIN, "--eval-every", "1", "--eval-n", "2"],
           capsys, "--eval-n must be at least 4")
    _fails(["eval", "--n", "2", "--steps", "2", "--no-progress"], capsys, "more than 3 features")


# ---------------------------------------------------------------- bad input: message, exit code, no output

def _fails(argv, capsys, *fragments):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("ddpm-fast: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_missing_empty_and_unreadable_data(tmp_path, capsys):
    out = tmp_path / "out"
    _fails(["train", "--data", str(tmp_path / "nope"), "--out", str(out), *FAST_TRAIN], capsys, "does not exist")
    (tmp_path / "empty").mkdir()
    _fails(["train", "--data", str(tmp_path / "empty"), "--out", str(out), *FAST_TRAIN], capsys, "holds no images")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    _fails(["train", "--data", str(tmp_path / "bad"), "--out", str(out), *FAST_TRAIN], capsys, "x.jpg")
    assert not out.exists()


def test_truncated_checkpoint_leaves_no_grid(run_dir, tmp_path, capsys):
    data = (run_dir / "checkpoint.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:1000])
    out = tmp_path / "grid.png"
    _fails(["sample", "--ckpt", str(tmp_path / "cut.pt"), "--out", str(out)], capsys, "cut.pt", "truncated")
    _fails(["eval-bpd", "--ckpt", str(tmp_path / "cut.pt")], capsys, "cut.pt")
    assert os.listdir(tmp_path) == ["cut.pt"]


def test_checkpoint_from_another_config(run_dir, tmp_path, capsys):
    _fails(["train", "--resume", str(run_dir / "checkpoint.pt"), "--out", str(tmp_path), "--steps", "9",
            "--preset", "tiny", "--no-progress"], capsys, "another configuration", "--preset 'tiny'")
    # Weights that do not fit the config they come with.
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    state["config"]["model"]["ch"] = 64
    torch.save(state, tmp_path / "other.pt")
    _fails(["sample", "--ckpt", str(tmp_path / "other.pt"), "--out", str(tmp_path / "g.png")], capsys,
           "do not fit the model")
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["sample", "--sampler", "euler"], "argument --sampler: invalid choice: 'euler'"),
    (["train", "--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (["train", "--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
    (["sample", "--n", "many"], "argument --n/--num-samples: expected a positive integer, got 'many'"),
    (["sample", "--eta", "-1"], "argument --eta: expected a number >= 0, got '-1'"),
    (["sample", "--eta", "nan"], "argument --eta: expected a number >= 0, got 'nan'"),
    (["train", "--lr", "0"], "argument --lr: expected a positive number, got '0'"),
    (["train", "--ema-decay", "1"], "argument --ema-decay: expected a number in [0, 1), got '1'"),
    (["train", "--grad-clip", "-0.5"], "argument --grad-clip: expected a number >= 0, got '-0.5'"),
    (["train", "--weight-decay", "x"], "argument --weight-decay: expected a number >= 0, got 'x'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_unknown_option_values_exit_non_zero(capsys, argv, fragment):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert fragment in capsys.readouterr().err


def test_info_and_python_m_entry_points(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"torch {torch.__version__}" in text and "backends for cpu tensors:" in text and "auto ->" in text
    # Run from a neutral directory, so the installed package is imported, not the source tree.
    via_module = subprocess.run([sys.executable, "-m", "ddpm_fast", "info"], capture_output=True, text=True,
                                cwd=tempfile.gettempdir())
    assert via_module.returncode == 0, via_module.stderr
    via_info = subprocess.run([sys.executable, "-m", "ddpm_fast.info"], capture_output=True, text=True,
                              cwd=tempfile.gettempdir())
    assert via_info.stdout == via_module.stdout and "C++ extension:" in via_info.stdout


# ---------------------------------------------------------------- class-conditional training


@pytest.fixture(scope="module")
def class_run(tmp_path_factory):
    """A 3-step class-conditional digits run, with a grid of 2 samples per class at step 3."""
    out = tmp_path_factory.mktemp("classes")
    argv = ["train", "--class-cond", "--cond-drop-prob", "0.2", "--steps", "3", "--out", str(out), *FAST_TRAIN,
            "--sample-every", "3", "--sample-n", "20", "--sample-steps", "2"]
    assert main(argv) == 0
    return out


def test_train_class_cond_records_the_classes(class_run):
    state = ckpt.load(class_run / "checkpoint.pt")
    assert state["config"]["class_names"] == [str(i) for i in range(10)]
    assert state["config"]["model"]["num_classes"] == 10
    assert state["config"]["train"]["class_cond"] is True and state["config"]["train"]["cond_drop_prob"] == 0.2
    assert state["ema"]["class_embed.weight"].shape == (11, 128)
    # One row per class, two samples each: 10 rows of 2 tiles (8x8 digits enlarged to 32x32, 2 px apart).
    grid = _png(class_run / "samples" / "step_0000003.png")
    assert grid.shape == (10 * 34 + 2, 2 * 34 + 2)


def test_class_conditional_checkpoint_samples_exports_and_evaluates(class_run, tmp_path, capsys):
    path = str(class_run / "checkpoint.pt")
    # Unconditional sampling (the null label) and the bound work as for any checkpoint.
    assert main(["sample", "--ckpt", path, "--n", "3", "--steps", "2", "--out", str(tmp_path / "a.png")]) == 0
    assert main(["eval-bpd", "--ckpt", path, "--n", "2", "--batch-size", "2"]) == 0
    assert "bits/dim" in capsys.readouterr().out
    small = tmp_path / "small.pt"
    assert main(["export", "--ckpt", path, "--out", str(small), "--half"]) == 0
    state = ckpt.load(small)
    assert state["config"]["class_names"] == [str(i) for i in range(10)] and "class_embed.weight" in state["ema"]
    assert main(["export", "--ckpt", path, "--diffusers", str(tmp_path / "pipe")]) == 0
    import json

    with open(tmp_path / "pipe" / "unet" / "config.json") as f:
        config = json.load(f)
    assert config["num_class_embeds"] == 11 and config["class_embed_type"] is None


def test_train_class_cond_on_an_image_folder(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for name, count in (("zebra", 3), ("cat", 4), ("dog", 3)):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "data" / name / f"{i}.png")
    out = tmp_path / "run"
    argv = ["train", "--data", str(tmp_path / "data"), "--preset", "tiny", "--class-cond", "--steps", "1",
            "--out", str(out), *FAST_TRAIN]
    assert main(argv) == 0
    state = ckpt.load(out / "checkpoint.pt")
    assert state["config"]["class_names"] == ["cat", "dog", "zebra"]  # sorted: label i is the i-th name
    assert state["config"]["model"]["num_classes"] == 3
    # An image directly in the data folder has no class: refused, with the layout to use.
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "data" / "loose.png")
    capsys.readouterr()
    assert main([*argv[:-len(FAST_TRAIN) - 2], "--out", str(tmp_path / "run2"), *FAST_TRAIN]) == 1
    err = capsys.readouterr().err
    assert "ddpm-fast: error: --class-cond reads the classes from the subfolders" in err and "'loose.png'" in err
    assert not (tmp_path / "run2").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--cond-drop-prob", "0.2", "--steps", "1"], "--cond-drop-prob applies to class-conditional training"),
    (["train", "--class-cond", "--cond-drop-prob", "1.5"], "expected a number in [0, 1], got '1.5'"),
])
def test_bad_class_options(tmp_path, capsys, argv, fragment):
    try:
        code = main([*argv, "--out", str(tmp_path / "x"), *FAST_TRAIN])
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    assert code != 0 and fragment in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("sampler", ["dpm++2m", "dpm++3m", "dpm++2m-sde"])
def test_sample_a_class_of_the_shipped_model(tmp_path, sampler):
    npz = tmp_path / "threes.npz"
    assert main(["sample", "--class", "3", "--n", "6", "--sampler", sampler, "--out", str(tmp_path / "g.png"),
                 "--npz", str(npz), "--device", "cpu"]) == 0
    with np.load(npz) as data:
        assert data["labels"].tolist() == [3] * 6 and data["samples"].shape == (6, 1, 8, 8)
        assert np.isfinite(data["samples"]).all()


def test_sample_every_class_in_grid_rows(tmp_path):
    npz = tmp_path / "all.npz"
    assert main(["sample", "--class", "all", "--n", "20", "--guidance", "1", "--out", str(tmp_path / "g.png"),
                 "--npz", str(npz), "--device", "cpu"]) == 0
    with np.load(npz) as data:
        assert data["labels"].tolist() == [k for k in range(10) for _ in range(2)]
    # 10 rows of 2 tiles: the grid is taller than wide.
    width, height = Image.open(tmp_path / "g.png").size
    assert height > 4 * width


def test_class_errors_name_the_option(run_dir, tmp_path, capsys):
    _fails(["sample", "--class", "12", "--out", str(tmp_path / "g.png")], capsys, "--class '12'", "0, 1, 2")
    _fails(["sample", "--ckpt", os.path.join(run_dir, "checkpoint.pt"), "--class", "3", "--out",
            str(tmp_path / "g.png")], capsys, "--class 3 needs a class-conditional model")
    assert not (tmp_path / "g.png").exists()
