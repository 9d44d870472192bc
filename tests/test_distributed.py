"""Training and sampling under torchrun: two CPU processes with the gloo backend."""

import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch.distributed as dist

from ddpm_fast import checkpoint as ckpt
from ddpm_fast.train import train

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available in this torch build")

ARGS = ["--batch-size", "8", "--timesteps", "50", "--warmup", "2", "--lr", "1e-3", "--ema-decay", "0.9",
        "--device", "cpu", "--no-progress"]


def _torchrun(*argv, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ddpm_fast.cli", *argv]
    # From a neutral directory: `-m` puts the working directory first on sys.path, and the source
    # tree there would shadow the installed package.
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=tempfile.gettempdir())


def test_two_process_training_matches_one_process(tmp_path):
    out = tmp_path / "ddp"
    result = _torchrun("train", "--steps", "3", "--out", str(out), "--sample-every", "3", "--sample-n", "3",
                       "--sample-steps", "2", *ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    # Rank 0 alone writes: one checkpoint, one grid, no temporary files.
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "samples"]
    assert os.listdir(out / "samples") == ["step_0000003.png"]
    state = ckpt.load(out / "checkpoint.pt")
    assert state["step"] == 3

    # The same global batches in one process give the same weights up to the order of the
    # gradient sum (DDP averages the two half-batch gradients).
    single = tmp_path / "single"
    options = dict(steps=3, batch_size=8, timesteps=50, warmup=2, lr=1e-3, ema_decay=0.9, device="cpu",
                   sample_every=0, progress=False, out=str(single))
    train(**options)
    reference = ckpt.load(single / "checkpoint.pt")
    diffs = {name: (state["model"][name] - value).abs().max().item() for name, value in reference["model"].items()}
    worst = max(diffs, key=diffs.get)
    # Adam moves each weight by about lr = 1e-3 per step, so other batches would differ by ~1e-3;
    # the summation order alone leaves ~1e-5 where gradients are tiny and Adam amplifies rounding.
    assert diffs[worst] < 1e-4, (worst, diffs[worst])


def test_batch_size_that_does_not_divide_is_refused(tmp_path):
    result = _torchrun("train", "--steps", "2", "--out", str(tmp_path / "x"), *ARGS, "--batch-size", "7")
    assert result.returncode != 0
    assert "--batch-size 7 must be divisible by the number of processes (2)" in result.stderr
    assert not (tmp_path / "x").exists()


def test_sharded_sampling_equals_one_process(tmp_path):
    train(steps=1, batch_size=8, timesteps=50, device="cpu", sample_every=0, progress=False, out=str(tmp_path))
    path = str(tmp_path / "checkpoint.pt")
    common = ["--ckpt", path, "--num-samples", "5", "--batch-size", "2", "--steps", "3", "--device", "cpu"]
    result = _torchrun("sample", *common, "--out", str(tmp_path / "ddp.png"), "--npz", str(tmp_path / "ddp.npz"))
    assert result.returncode == 0, result.stderr[-3000:]
    from ddpm_fast.cli import main

    assert main(["sample", *common, "--out", str(tmp_path / "one.png"), "--npz", str(tmp_path / "one.npz")]) == 0
    with np.load(tmp_path / "ddp.npz") as a, np.load(tmp_path / "one.npz") as b:
        assert a["samples"].shape == (5, 1, 8, 8)
        np.testing.assert_allclose(a["samples"], b["samples"], rtol=0, atol=1e-5)


def test_sharded_eval_equals_one_process_and_errors_stop_every_rank(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    common = ["eval", "--num-samples", "24", "--batch-size", "8", "--steps", "3", "--device", "cpu", "--no-progress"]
    result = _torchrun(*common, "--json", str(tmp_path / "ddp.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    from ddpm_fast.cli import main

    assert main([*common, "--json", str(tmp_path / "one.json")]) == 0
    ddp, one = (json.loads((tmp_path / name).read_text()) for name in ("ddp.json", "one.json"))
    assert ddp["n"] == one["n"] == 24
    for key in ("fid", "kid_mean", "precision", "recall"):
        assert ddp[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
    # A reference the main rank cannot read stops both ranks with the message (no rank left waiting).
    result = _torchrun(*common, "--ref", str(tmp_path / "missing.npz"))
    assert result.returncode != 0 and "does not exist" in result.stderr
