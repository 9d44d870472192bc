"""Files and faults: what the command line does with bad files, unwritable places and a full disk.

One table of failing commands. Each must end with one ``ddpm-fast: error: ...`` line naming
the file or option (no traceback), exit with the expected code, and leave every file that was
there before byte-identical, with nothing added (no output, no temporary file). Then the
cases that succeed with a note: high-depth and mixed images, resuming without RNG states,
stale locks and temporary files of a killed run.
"""

import errno
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast import checkpoint as ckpt
from ddpm_fast import fileio
from ddpm_fast.cli import build_parser, main
from ddpm_fast.data import load_dataset

T = 20
FAST = ["--batch-size", "8", "--timesteps", str(T), "--ch", "8", "--sample-every", "0", "--no-progress",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The bytes of a 2-step training checkpoint of a tiny digits model (T = 20)."""
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--steps", "2", "--out", str(out), *FAST]) == 0
    assert sorted(os.listdir(out)) == ["checkpoint.pt"]  # no lock, no temporary file left
    return (out / "checkpoint.pt").read_bytes()


def _snapshot(folder):
    files = {}
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, folder)] = None if os.path.isdir(path) else open(path, "rb").read()
    return files


def _nan_checkpoint(data):
    def make(path):
        path.write_bytes(data)
        state = torch.load(path, weights_only=True)
        for weights in (state["ema"], state["model"]):
            next(v for v in weights.values() if v.is_floating_point()).view(-1)[0] = float("nan")
        torch.save(state, path)
    return make


def _disk_full(monkeypatch):
    def write(self, data):
        self.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise self.error
    monkeypatch.setattr(fileio._RecordingFile, "write", write)


def _zip_writer_fails(monkeypatch):
    # What torch.save reports when the disk fills under a path (no OSError reaches Python).
    def save(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0 "
                           "[Errno 28] No space left on device")
    monkeypatch.setattr(ckpt.torch, "save", save)


def _read_only(monkeypatch):
    def replace(source, destination):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), destination)
    monkeypatch.setattr(fileio.os, "replace", replace)


def _no_write_permission(monkeypatch):
    monkeypatch.setattr(fileio.os, "access", lambda path, mode: False)


def _live_lock(host=None):
    def make(tmp):
        (tmp / "run").mkdir()
        (tmp / "run" / ".lock").write_text(
            '{"pid": %d, "host": "%s", "started": 0}' % (os.getpid(), host or socket.gethostname()))
    return make


def _image_folder(*specs):
    """specs: (name, array) pairs written as PNGs into tmp/imgs."""
    def make(tmp):
        (tmp / "imgs").mkdir()
        for name, array in specs:
            Image.fromarray(array).save(tmp / "imgs" / name)
    return make


def _small_image_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # 8x8 images (64 px) count as decompression bombs


GREY = np.zeros((8, 8), np.uint8)
BIG = np.zeros((16, 16), np.uint8)


def _file(name, text="keep me"):
    return lambda tmp: (tmp / name).write_text(text)


def _folder(name):
    return lambda tmp: (tmp / name).mkdir()


# (id, files to create, monkeypatch or None, argv (TMP and CKPT replaced), exit code, fragments of the message)
CASES = [
    # ------------------------------------------------------------ destinations, checked before the work
    ("sample --out under a file", _file("plain"), None,
     ["sample", "--ckpt", "CKPT", "--out", "TMP/plain/grid.png"], 1, ["--out", "plain", "is a file, not a folder"]),
    ("sample --out onto a folder", _folder("grid.png"), None,
     ["sample", "--ckpt", "CKPT", "--out", "TMP/grid.png"], 1, ["--out", "it is a folder", "give the path of a file"]),
    ("sample --npz under a file", _file("plain"), None,
     ["sample", "--ckpt", "CKPT", "--out", "TMP/g.png", "--npz", "TMP/plain/x.npz"], 1, ["--npz", "is a file"]),
    ("sample --out in a folder one may not write", None, _no_write_permission,
     ["sample", "--ckpt", "CKPT", "--out", "TMP/new/grid.png"], 1, ["--out", "permission denied"]),
    ("export --out onto a folder", _folder("small.pt"), None,
     ["export", "--ckpt", "CKPT", "--out", "TMP/small.pt"], 1, ["--out", "it is a folder"]),
    ("export --out under a file", _file("plain"), None,
     ["export", "--ckpt", "CKPT", "--out", "TMP/plain/small.pt"], 1, ["--out", "is a file, not a folder"]),
    ("export --diffusers onto a file", _file("pipe"), None,
     ["export", "--ckpt", "CKPT", "--diffusers", "TMP/pipe"], 1, ["--diffusers", "it is a file"]),
    ("train --out is a file", _file("run"), None,
     ["train", "--out", "TMP/run", "--steps", "1", *FAST], 1, ["--out", "it is a file"]),
    ("train --out under a file", _file("plain"), None,
     ["train", "--out", "TMP/plain/run", "--steps", "1", *FAST], 1, ["--out", "is a file, not a folder"]),
    ("train --out whose checkpoint.pt is a folder", lambda tmp: (tmp / "run" / "checkpoint.pt").mkdir(parents=True),
     None, ["train", "--out", "TMP/run", "--steps", "1", *FAST], 1, ["checkpoint.pt", "move it away"]),
    ("train --out one may not write in", _folder("run"), _no_write_permission,
     ["train", "--out", "TMP/run", "--steps", "1", *FAST], 1, ["--out", "permission denied"]),
    # ------------------------------------------------------------ a full disk
    ("sample --out on a full disk", None, _disk_full,
     ["sample", "--ckpt", "CKPT", "--n", "2", "--steps", "2", "--out", "TMP/grid.png"], 1,
     ["--out", "grid.png", "the disk is full"]),
    ("sample --out on a read-only file system", None, _read_only,
     ["sample", "--ckpt", "CKPT", "--n", "2", "--steps", "2", "--out", "TMP/g.png", "--npz", "TMP/x.npz"],
     1, ["--out", "g.png", "read-only"]),
    ("export --out on a full disk (torch's zip writer)", None, _disk_full,
     ["export", "--ckpt", "CKPT", "--out", "TMP/small.pt"], 1, ["--out", "small.pt", "the disk is full"]),
    ("export --out: zip writer error naming no space", None, _zip_writer_fails,
     ["export", "--ckpt", "CKPT", "--out", "TMP/small.pt"], 1, ["--out", "the disk is full"]),
    # ------------------------------------------------------------ option values that reach PyTorch
    ("sample --seed beyond 64 bits", None, None, ["sample", "--seed", str(2 ** 64)], 2,
     ["--seed", "expected an integer in [0, 2**64)"]),
    ("train --seed negative", None, None, ["train", "--seed", "-1"], 2, ["--seed"]),
    ("sample --steps beyond the schedule", None, None,
     ["sample", "--ckpt", "CKPT", "--sampler", "ddim", "--steps", "21", "--out", "TMP/g.png"], 1,
     ["--steps 21", f"between 1 and {T}"]),
    ("sample --steps that repeat timesteps (dpm++2m)", None, None,
     ["sample", "--ckpt", "CKPT", "--steps", str(T), "--out", "TMP/g.png"], 1, [f"--steps {T}", "at most"]),
    ("train --sample-steps beyond --timesteps", None, None,
     ["train", "--out", "TMP/run", "--steps", "1", *FAST, "--sample-every", "1", "--sample-steps", "50"], 1,
     ["--sample-steps 50", f"between 1 and {T}"]),
    # ------------------------------------------------------------ wrong data
    ("sample from NaN weights", "NAN", None, ["sample", "--ckpt", "TMP/nan.pt", "--out", "TMP/g.png"], 1,
     ["nan.pt", "NaN or infinite", "EMA weights"]),
    ("sample --no-ema from NaN weights", "NAN", None,
     ["sample", "--ckpt", "TMP/nan.pt", "--no-ema", "--npz", "TMP/x.npz", "--out", "TMP/g.png"], 1,
     ["nan.pt", "model weights"]),
    ("eval-bpd of NaN weights", "NAN", None, ["eval-bpd", "--ckpt", "TMP/nan.pt", "--n", "2"], 1, ["nan.pt", "NaN"]),
    ("export of NaN weights", "NAN", None, ["export", "--ckpt", "TMP/nan.pt", "--out", "TMP/small.pt"], 1,
     ["nan.pt", "NaN"]),
    ("train on a decompression bomb", _image_folder(("a.png", GREY), ("b.png", GREY), ("bomb.png", GREY)),
     _small_image_limit, ["train", "--data", "TMP/imgs", "--out", "TMP/run", "--steps", "1", *FAST], 1,
     ["a.png", "too large to read safely"]),
    ("train on images of two sizes", _image_folder(("a.png", GREY), ("b.png", BIG)), None,
     ["train", "--data", "TMP/imgs", "--out", "TMP/run", "--steps", "1", *FAST], 1,
     ["16x16", "8x8", "--image-size N"]),
    ("train on a truncated image", lambda tmp: ((tmp / "imgs").mkdir(), (tmp / "imgs" / "x.png").write_bytes(
        b"\x89PNG\r\n\x1a\n cut")), None,
     ["train", "--data", "TMP/imgs", "--out", "TMP/run", "--steps", "1", *FAST], 1, ["x.png", "remove or replace"]),
    # ------------------------------------------------------------ state that is assumed
    ("train on a folder another live run holds", _live_lock(), None,
     ["train", "--out", "TMP/run", "--steps", "1", *FAST], 1, ["--out", "in use by another training run"]),
    ("train on a folder locked from another host", _live_lock("elsewhere"), None,
     ["train", "--out", "TMP/run", "--steps", "1", *FAST], 1, ["locked by pid", "elsewhere", "delete"]),
    ("resume a sampling-only checkpoint", "SMALL", None,
     ["train", "--resume", "TMP/small.pt", "--steps", "3", "--no-progress"], 1, ["small.pt", "not a training"]),
    ("resume a missing checkpoint", None, None,
     ["train", "--out", "TMP/run", "--resume", "--steps", "3", "--no-progress"], 1,
     ["checkpoint.pt", "nothing to --resume"]),
]


def _prepare(setup, tmp, data):
    if setup == "NAN":
        _nan_checkpoint(data)(tmp / "nan.pt")
    elif setup == "SMALL":
        state = torch.load(tmp / "ckpt.pt", weights_only=True)
        torch.save({"config": state["config"], "ema": state["ema"], "step": 2, "format_version": 1},
                   tmp / "small.pt")
    elif setup is not None:
        setup(tmp)


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_a_failing_command_says_one_line_and_changes_no_file(case, trained, tmp_path, monkeypatch, capsys):
    _, setup, patch, argv, code, fragments = case
    (tmp_path / "ckpt.pt").write_bytes(trained)
    _prepare(setup, tmp_path, trained)
    monkeypatch.chdir(tmp_path)  # a default --out lands here, and is then seen
    before = _snapshot(tmp_path)
    argv = [arg.replace("TMP", str(tmp_path)).replace("CKPT", str(tmp_path / "ckpt.pt")) for arg in argv]
    if patch is not None:
        patch(monkeypatch)
    if code == 2:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith("ddpm-fast ")
    else:
        assert main(argv) == code
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if not line.startswith("ddpm-fast: note: ")]
        assert len(lines) == 1 and lines[0].startswith("ddpm-fast: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before


def test_the_table_covers_each_kind_of_fault():
    assert len(CASES) >= 30 and len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: chmod cannot stop root from writing (the table's "
                                              "permission cases patch os.access instead)")
def test_a_folder_without_write_permission_is_refused_before_sampling(trained, tmp_path, capsys):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert main(["sample", "--ckpt", str(tmp_path / "missing.pt"), "--out", str(folder / "g.png")]) == 1
        assert "permission denied" in capsys.readouterr().err
        assert os.listdir(folder) == []
    finally:
        folder.chmod(0o700)


# ---------------------------------------------------------------- bugs, --debug, interrupts

def test_a_bug_prints_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    import ddpm_fast.cli as cli

    monkeypatch.setattr(cli, "_run_export", lambda args: 1 / 0)
    assert main(["export", "--ckpt", "x", "--out", "y"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err
    assert err.splitlines()[-1].startswith("ddpm-fast: error: unexpected ZeroDivisionError")
    assert "please report this with the command you ran" in err


def test_an_os_error_naming_a_file_is_one_line(monkeypatch, capsys):
    import ddpm_fast.cli as cli

    def denied(args):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/secret.png")

    monkeypatch.setattr(cli, "_run_sample", denied)
    assert main(["sample"]) == 1
    err = capsys.readouterr().err
    assert err == "ddpm-fast: error: cannot use '/data/secret.png': permission denied; check its permissions\n"


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_of_a_user_error(where, tmp_path, capsys):
    argv = ["sample", "--ckpt", str(tmp_path / "missing.pt")]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("ddpm-fast: error: checkpoint")


def test_an_interrupt_exits_130(monkeypatch, capsys):
    import ddpm_fast.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_sample", interrupted)
    assert main(["sample"]) == 130
    assert "interrupted" in capsys.readouterr().err


# ---------------------------------------------------------------- atomic writes

def test_a_full_disk_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "grid.png"
    target.write_bytes(b"the previous grid")
    _disk_full(monkeypatch)
    with pytest.raises(fileio.OutputError, match="the disk is full") as info:
        fileio.atomic_write(target, lambda f: f.write(b"x" * 100), "--out")
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert os.listdir(tmp_path) == ["grid.png"] and target.read_bytes() == b"the previous grid"


def test_stale_temporaries_of_a_dead_process_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    prefix, _ = fileio.temporary_name(tmp_path / "grid.png")
    stale = tmp_path / (prefix.replace(f"-{os.getpid()}.", f"-{dead_pid}.") + "abc123.tmp")
    live = tmp_path / (prefix + "def456.tmp")  # this process: a write in progress
    other = tmp_path / ".grid.png.tmp"  # not ours: never touched
    for path in (stale, live, other):
        path.write_bytes(b"partial")
    fileio.atomic_write(tmp_path / "grid.png", lambda f: f.write(b"new"))
    assert sorted(os.listdir(tmp_path)) == sorted(["grid.png", live.name, other.name])


# ---------------------------------------------------------------- runs: lock, stale lock, resume

def test_a_killed_runs_lock_and_temporaries_are_taken_over(trained, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(trained)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (run / ".lock").write_text('{"pid": %d, "host": "%s", "started": 0}' % (pid, socket.gethostname()))
    prefix, _ = fileio.temporary_name(run / "checkpoint.pt")
    (run / (prefix.replace(f"-{os.getpid()}.", f"-{pid}.") + "k1ll3d.tmp")).write_bytes(b"half a checkpoint")
    assert main(["train", "--out", str(run), "--resume", "--steps", "3", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert f"taking over the lock of a run that no longer runs (pid {pid})" in captured.err
    assert "removed 1 temporary file(s)" in captured.err
    assert "at step 2 (training to step 3)" in captured.err
    assert "trained to step 3" in captured.out and "resumed at step 2" in captured.out
    assert sorted(os.listdir(run)) == ["checkpoint.pt"]  # lock released, temporary gone


def test_resume_without_rng_states_continues_with_a_note(trained, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(trained)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    del state["rng"]
    torch.save(state, run / "checkpoint.pt")
    assert main(["train", "--resume", str(run / "checkpoint.pt"), "--steps", "3", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "ddpm-fast: note: checkpoint" in err and "no usable random generator states" in err
    assert ckpt.load(run / "checkpoint.pt")["step"] == 3


def test_a_failed_start_removes_the_run_folder_it_created(tmp_path, capsys):
    out = tmp_path / "a" / "b"
    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(out), *FAST]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- image folders

def test_16_bit_pngs_are_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 50], [257 * 100, 65535]], dtype=np.uint16)
    for i in range(4):
        Image.fromarray(values).save(tmp_path / f"{i}.png")
    with Image.open(tmp_path / "0.png") as image:
        assert image.mode.startswith("I")  # what Pillow opens a 16-bit grey PNG as
    images = torch.cat([load_dataset(str(tmp_path), split) for split in ("train", "test")])
    pixels = ((images + 1) * 127.5).round().to(torch.uint8)
    assert images.shape == (4, 1, 2, 2)
    assert (pixels == torch.tensor([[0, 50], [100, 255]], dtype=torch.uint8)).all()


def test_grey_and_colour_images_together_become_rgb(tmp_path):
    Image.fromarray(np.full((4, 4), 10, np.uint8)).save(tmp_path / "grey.png")
    Image.fromarray(np.full((4, 4, 3), 200, np.uint8)).save(tmp_path / "colour.png")
    images = torch.cat([load_dataset(str(tmp_path), split) for split in ("train", "test")])
    assert images.shape == (2, 3, 4, 4)
    values = sorted(((images + 1) * 127.5).round().flatten().unique().tolist())
    assert values == [10, 200]


# ---------------------------------------------------------------- what a new user reads first

@pytest.mark.parametrize("command", ["train", "sample", "eval-bpd", "export"])
def test_help_shows_each_default_once_and_only_real_ones(command):
    parser = build_parser()
    text = parser._subparsers._group_actions[0].choices[command].format_help()
    flat = " ".join(text.split())
    assert "(default: None)" not in flat and "(default: True)" not in flat and "(default: False)" not in flat
    for block in flat.split(" --")[1:]:
        assert block.count("(default") <= 1, block
    if command == "train":
        assert "total optimizer steps (default: 5000)" in flat and "(default 5000)" not in flat


def test_p_losses_on_one_image_asks_for_a_batch():
    from ddpm_fast import GaussianDiffusion

    with pytest.raises(ValueError, match=r"x_start must be a batch \[batch, channels, height, width\]"):
        GaussianDiffusion(num_timesteps=10).p_losses(lambda x, t: x, torch.randn(3, 8, 8), torch.tensor([1]))
