"""Training loop and sampling behind ``ddpm-fast train`` / ``sample`` / ``eval-bpd``.

Reproducibility: everything random in a training step (the batch, the timesteps, the noise, label
dropout, dropout) is drawn from seeds derived from (seed, step, rank), and the checkpoint holds the
model, EMA, optimizer, scaler, step and RNG states; so on the CPU, N steps in one run and
k steps + ``--resume`` + N - k steps give the same weights bit for bit.

Distributed: launched by torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) the
loop wraps the model in DistributedDataParallel, each rank trains on its slice of the global
batch, and only rank 0 writes checkpoints and grids. Sampling splits the batches over ranks
and gathers them.
"""

import dataclasses
import errno
import math
import os
import sys

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from . import samplers
from .conditioning import WithLabels, model_classes
from .data import DataError, StepSampler, load_dataset, mix_seed
from .ema import EMA
from .errors import note
from .fileio import OutputError, RunLock, check_output_file, check_output_folder, remove_stale_temporaries
from .images import save_grid
from .validation import check_number

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# The --sampler choices: the loop each runs, and the DPM-Solver++ options it fixes (the others come
# from the diffusion's sampler defaults). ddpm: all T ancestral steps; ddim: DDIM with eta;
# dpm++2m: DPM-Solver++ 2M, the fastest for its quality; dpm++3m: third order; dpm++2m-sde: the
# stochastic 2M solver.
SAMPLER_LOOPS = {
    "ddpm": ("ddpm", {}),
    "ddim": ("ddim", {}),
    "dpm++2m": ("dpm_solver", {"order": 2, "sde": False}),
    "dpm++3m": ("dpm_solver", {"order": 3, "sde": False}),
    "dpm++2m-sde": ("dpm_solver", {"order": 2, "sde": True}),
}
SAMPLERS = tuple(SAMPLER_LOOPS)
CHECKPOINT_NAME = "checkpoint.pt"
SAMPLES_FOLDER = "samples"
SEED_LIMIT = 2 ** 64  # torch.manual_seed takes seeds in [0, 2**64)

# What shapes the model and the noise process: a resumed run must use the checkpoint's values.
STRUCTURAL_OPTIONS = ("data", "preset", "ch", "ch_mult", "image_size", "timesteps", "schedule", "prediction_type",
                      "loss_type", "batch_size", "seed", "class_cond")

DEFAULTS = dict(
    data="digits", preset=None, ch=None, ch_mult=None, image_size=None, timesteps=1000, schedule="linear",
    prediction_type="epsilon", loss_type="mse", steps=5000, batch_size=128, lr=2e-4, warmup=500, weight_decay=0.0,
    grad_clip=1.0, ema_decay=0.9999, precision="fp32", out="runs/ddpm", sample_every=1000, sample_n=64,
    # DPM-Solver++ 2M at 20 steps: the sample quality of DDIM at 50 steps and DDPM at 1000 on the
    # digits model (benchmarks/results/sampler-quality-cpu.md; docs/cli.md says why).
    sampler="dpm++2m", sample_steps=20, ckpt_every=1000, seed=0, device="auto", resume=None, progress=True,
    # Class-conditional training with label dropout (classifier-free guidance): each label is
    # replaced by the null label with probability cond_drop_prob (Ho & Salimans 2022 use 0.1 or 0.2).
    class_cond=False, cond_drop_prob=0.1,
    # FID/KID/precision/recall of eval_n EMA samples every eval_every steps (0 = never): see _evaluator.
    eval_every=0, eval_n=256,
)


# The classifier-free guidance scale of `ddpm-fast sample --class` (docs/sampling.md measures it
# on the shipped digits model).
DEFAULT_GUIDANCE = 2.0


class ConfigError(ValueError):
    """An option value that cannot work; the message names the option."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


# ---------------------------------------------------------------- processes and devices

class Dist:
    """Rank, world size and device of this process; initialises torch.distributed under torchrun."""

    def __init__(self, device="auto"):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(device, self.local_rank)
        self.initialised_here = False
        if self.world_size > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.initialised_here = True

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def close(self):
        if self.initialised_here and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(device, local_rank=0):
    if device in (None, "auto"):
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device} was asked for but CUDA is not available (use --device cpu)")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    elif device.type != "cpu":
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {str(device)!r}")
    return device


# ---------------------------------------------------------------- model and diffusion from a config

def build_model(model_config, device):
    from .nn import UNet

    try:
        return UNet(**model_config).to(device)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"cannot build the UNet from {model_config}: {error}") from None


def build_diffusion(diffusion_config):
    from .diffusion import GaussianDiffusion

    try:
        return GaussianDiffusion(**diffusion_config)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"cannot build the diffusion from {diffusion_config}: {error}") from None


def model_config_for(preset, channels, image_size, ch=None, ch_mult=None):
    """The UNet preset adapted to the data (channels, image size), with optional width overrides."""
    from .nn import UNet

    if preset not in UNet.PRESETS:
        raise ConfigError(f"--preset must be one of {sorted(UNet.PRESETS)}, got {preset!r}")
    config = dict(UNet.PRESETS[preset], in_channels=channels, out_channels=channels, image_size=image_size)
    if ch is not None:
        config["ch"] = ch
    if ch_mult is not None:
        config["ch_mult"] = tuple(ch_mult)
    return {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}


def check_finite_weights(weights, source, what="weights"):
    """Refuses weights holding NaN or inf (a diverged run): they would sample blank images.

    weights: a module or a state dict; source: what they came from, for the message."""
    tensors = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    bad = [name for name, value in tensors.items()
           if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise ckpt.CheckpointError(
            f"the {what} of {source} hold NaN or infinite values ({len(bad)} of {len(tensors)} tensors, e.g. "
            f"{bad[0]!r}): they come from a diverged run and would sample blank images; use an earlier "
            f"checkpoint, or train again with a lower --lr")


def check_sample_steps(diffusion, sampler, steps, option):
    """Refuses a step count the sampler cannot take with this diffusion, naming ``option``."""
    loop, options = SAMPLER_LOOPS[sampler]
    if loop == "ddpm" or steps is None:
        return
    if steps > diffusion.num_timesteps:
        raise ConfigError(f"{option} {steps} is more than the model's {diffusion.num_timesteps} diffusion "
                          f"timesteps; choose {option} between 1 and {diffusion.num_timesteps}")
    fitted = samplers.fit_num_steps(diffusion, loop, steps, **options)
    if fitted != steps:
        raise ConfigError(f"{option} {steps} does not fit the model's {diffusion.num_timesteps}-step schedule with "
                          f"spacing {diffusion.sampler_defaults.spacing!r} (timesteps would repeat); choose {option} "
                          f"at most {fitted}")


def load_for_sampling(path, device, use_ema=True):
    """(model in eval mode, diffusion, checkpoint) from a checkpoint file."""
    state = ckpt.load(path)
    config = state["config"]
    if not isinstance(config, dict) or "model" not in config or "diffusion" not in config:
        raise ckpt.CheckpointError(f"checkpoint {path!r} has no model/diffusion config")
    model = build_model(config["model"], device)
    if use_ema and "ema" not in state:
        raise ckpt.CheckpointError(f"checkpoint {path!r} holds no EMA weights (use --no-ema)")
    if not use_ema and "model" not in state:
        raise ckpt.CheckpointError(f"checkpoint {path!r} holds only EMA weights (use --ema)")
    weights = state["ema"] if use_ema else state["model"]
    check_finite_weights(weights, f"checkpoint {os.fspath(path)!r}", "EMA weights" if use_ema else "model weights")
    ckpt.load_weights(model, {k: v.float() if v.is_floating_point() else v for k, v in weights.items()},
                      "EMA" if use_ema else "model", path)
    return model.eval(), build_diffusion(config["diffusion"]), state


# ---------------------------------------------------------------- sampling (sharded over ranks)

def sample_labels(spec, n, model, class_names=None):
    """(labels [n] or None, samples per grid row or None) for --class: a class (index or name), or "all".

    "all" draws ceil(n / K) samples of each class in turn, so a grid with that many per row shows
    one class per row. None: unconditional samples (the null label of a class-conditional model).
    """
    if spec is None:
        return None, None
    num_classes, _ = model_classes(model)
    if num_classes is None:
        raise ConfigError(f"--class {spec} needs a class-conditional model (trained with --class-cond); this one "
                          f"has no classes")
    names = [str(name) for name in class_names] if class_names else [str(k) for k in range(num_classes)]
    if spec == "all":
        per_class = math.ceil(n / num_classes)
        return torch.arange(num_classes).repeat_interleave(per_class)[:n], per_class
    if spec in names:
        index = names.index(spec)
    elif spec.isdigit() and int(spec) < num_classes:
        index = int(spec)
    else:
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise ConfigError(f"--class {spec!r} is not a class of this model; its classes are {shown} (or 'all')")
    return torch.full((n,), index, dtype=torch.long), None


def sample_steps(diffusion, sampler, steps=None):
    """The step count of a sampler: ``steps``, checked against the schedule, or the default, fitted to it.

    A default that the schedule cannot place (a 20-step pipeline with "leading" spacing, say) is
    capped to the largest count that fits, and stderr says so; an explicit impossible count is
    a ConfigError naming --steps.
    """
    loop, options = SAMPLER_LOOPS[sampler]
    if loop == "ddpm":
        return diffusion.num_timesteps
    if steps is not None:
        check_sample_steps(diffusion, sampler, steps, "--steps")
        return steps
    fitted = samplers.fit_num_steps(diffusion, loop, DEFAULTS["sample_steps"], **options)
    if fitted != DEFAULTS["sample_steps"]:
        note(f"sampling with {fitted} steps, the most this model's {diffusion.num_timesteps}-step schedule allows "
             f"(spacing {diffusion.sampler_defaults.spacing!r}); --steps sets the count")
    return fitted


@torch.no_grad()
def generate(model, diffusion, n, *, batch_size=64, sampler="ddim", steps=None, eta=0.0, seed=0, clip=True,
             dist_info=None, progress=False, y=None, guidance_scale=1.0):
    """n samples [n, C, H, W] in [-1, 1] on the CPU (on every rank).

    steps: of ddim and the DPM-Solver++ samplers (None: the default, fitted to the schedule; see
    :func:`sample_steps`). clip: clamp each step's predicted x_0 to the data range [-1, 1] (fewer
    off-manifold samples). y: [n] class labels of a class-conditional model (None: unconditional),
    guided with ``guidance_scale`` (1: the conditional model alone).

    Batch b is drawn from a generator seeded with (seed, b), and batches are dealt to ranks
    round-robin, so the samples do not depend on the number of processes.
    """
    if sampler not in SAMPLERS:
        raise ConfigError(f"--sampler must be one of {list(SAMPLERS)}, got {sampler!r}")
    if n < 1 or batch_size < 1:
        raise ConfigError(f"--n and --batch-size must be positive, got {n} and {batch_size}")
    loop, options = SAMPLER_LOOPS[sampler]
    steps = sample_steps(diffusion, sampler, steps)
    rank, world = (dist_info.rank, dist_info.world_size) if dist_info else (0, 1)
    device = next(model.parameters()).device
    config = model.config
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    mine = {}
    for b in range(rank, len(sizes), world):
        generator = torch.Generator(device).manual_seed(mix_seed(seed, b))
        shape = (sizes[b], config["in_channels"], config["image_size"], config["image_size"])
        start = sum(sizes[:b])
        labels = None if y is None else y[start:start + sizes[b]].to(device)
        common = dict(generator=generator, progress=progress, clip_denoised=clip, y=labels,
                      guidance_scale=guidance_scale)
        if loop == "ddpm":
            x = diffusion.p_sample_loop(model, shape, **common)
        elif loop == "ddim":
            x = diffusion.ddim_sample_loop(model, shape, num_steps=steps, eta=eta, **common)
        else:
            x = diffusion.dpm_solver_sample_loop(model, shape, num_steps=steps, **options, **common)
        mine[b] = x.float().clamp(-1, 1)
    if world == 1:
        return torch.cat([mine[b] for b in range(len(sizes))]).cpu()
    # Gather: every rank sends a fixed-size [slots, batch, C, H, W] block, padded with zeros.
    slots = math.ceil(len(sizes) / world)
    shape = (slots, batch_size, config["in_channels"], config["image_size"], config["image_size"])
    block = torch.zeros(shape, device=device)
    for j, b in enumerate(range(rank, len(sizes), world)):
        block[j, :sizes[b]] = mine[b]
    gathered = [torch.empty_like(block) for _ in range(world)]
    dist.all_gather(gathered, block)
    return torch.cat([gathered[b % world][b // world, :sizes[b]] for b in range(len(sizes))]).cpu()


# ---------------------------------------------------------------- training

def _resolve_options(options):
    """Options with defaults filled in; on --resume, structural options come from the checkpoint."""
    options = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    for name, choices in (("precision", PRECISIONS), ("schedule", ("linear", "cosine")),
                          ("prediction_type", ("epsilon", "x0", "v")), ("loss_type", ("mse", "l1", "vlb")),
                          ("sampler", SAMPLERS)):
        if options[name] not in choices:
            raise ConfigError(f"--{name.replace('_', '-')} must be one of {list(choices)}, got {options[name]!r}")
    for name in ("steps", "batch_size", "timesteps", "sample_n", "sample_steps", "eval_n"):
        if not isinstance(options[name], int) or options[name] < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {options[name]!r}")
    for name in ("sample_every", "ckpt_every", "warmup", "eval_every"):
        if not isinstance(options[name], int) or options[name] < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be a non-negative integer (0 = never), "
                              f"got {options[name]!r}")
    seed = options["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"--seed must be an integer in [0, 2**64), got {seed!r}")
    numbers = {"lr": dict(minimum=0.0, open_min=True), "weight_decay": dict(minimum=0.0),
               "grad_clip": dict(minimum=0.0), "ema_decay": dict(minimum=0.0, maximum=1.0, open_max=True),
               "cond_drop_prob": dict(minimum=0.0, maximum=1.0)}
    for name, bounds in numbers.items():
        try:
            options[name] = check_number(f"--{name.replace('_', '-')}", options[name], **bounds)
        except (TypeError, ValueError) as error:
            raise ConfigError(str(error)) from None
    if not isinstance(options["class_cond"], bool):
        raise ConfigError(f"--class-cond must be True or False, got {options['class_cond']!r}")
    return options


def _lr_at(step, lr, warmup):
    """Linear warm-up over the first ``warmup`` steps, then constant."""
    return lr * min(1.0, (step + 1) / warmup) if warmup else lr


def _check_run_folder(out):
    """Refuses, before any work, a run folder that cannot hold checkpoint.pt and samples/."""
    check_output_folder(out, "--out")
    if os.path.isdir(out):
        if os.path.isdir(os.path.join(out, CHECKPOINT_NAME)):
            raise OutputError(f"--out {out!r} holds a folder named {CHECKPOINT_NAME!r} where the checkpoint goes; "
                              f"move it away or choose another --out", errno.EISDIR)
        check_output_file(os.path.join(out, CHECKPOINT_NAME), "--out")
        check_output_folder(os.path.join(out, SAMPLES_FOLDER), "--out")


def train(**options):
    """Trains a model; returns {"step", "start_step", "checkpoint", "loss"}. Options: see ``DEFAULTS``.

    The run folder (``out``) is checked before any work and locked (``out/.lock``) while the run
    writes there: a second run on it is refused while the first lives. Raises DataError,
    CheckpointError, ConfigError, TrainingDiverged, OutputError or RunLockedError with a message
    for the user.
    """
    progress = options.pop("progress", True)
    resume = options.pop("resume", None)
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown training options {unknown}")
    path = None
    if resume:
        path = os.path.join(given.get("out", DEFAULTS["out"]), CHECKPOINT_NAME) if resume == "auto" else resume
        path = os.fspath(path)
        given.setdefault("out", os.path.dirname(os.path.abspath(path)))  # keep writing next to the checkpoint
    out = given.get("out", DEFAULTS["out"])
    _check_run_folder(out)
    lock = RunLock(out, "--out", on_stale=note) if int(os.environ.get("RANK", "0")) == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        if lock is not None:
            stale = remove_stale_temporaries(out) + remove_stale_temporaries(os.path.join(out, SAMPLES_FOLDER))
            if stale:
                note(f"removed {len(stale)} temporary file(s) left in {out!r} by a run that was killed")
        return _resume_and_train(given, path, progress)
    finally:
        if lock is not None:
            lock.release()


def _resume_and_train(given, path, progress):
    state, explicit = None, set(given)
    if path is not None:
        if not os.path.exists(path):
            raise ckpt.CheckpointError(f"checkpoint {path!r} does not exist, so there is nothing to --resume; give "
                                       f"--resume the checkpoint's path, or drop --resume to start a new run")
        state = ckpt.load(path)
        saved = state["config"].get("train")
        if not isinstance(saved, dict) or "model" not in state or "optimizer" not in state:
            raise ckpt.CheckpointError(f"checkpoint {path!r} is not a training checkpoint (it holds no "
                                       f"optimizer state); start a new run instead of --resume")
        # An option the checkpoint lacks (written before it existed) had its default then.
        conflicts = [f"--{k.replace('_', '-')} {given[k]!r} (checkpoint: {saved.get(k, DEFAULTS[k])!r})"
                     for k in STRUCTURAL_OPTIONS if k in given and given[k] != saved.get(k, DEFAULTS[k])]
        if conflicts:
            raise ckpt.CheckpointError(f"checkpoint {path!r} comes from another configuration: "
                                       f"{', '.join(conflicts)}; drop these options to resume, or start a new run")
        # Every option not given again continues with the checkpoint's value (lr, EMA decay, ...).
        given = {**{k: v for k, v in saved.items() if k in DEFAULTS and v is not None}, **given}
    options = _resolve_options(given)
    if "cond_drop_prob" in explicit and not options["class_cond"]:
        raise ConfigError("--cond-drop-prob applies to class-conditional training: add --class-cond")

    world = Dist(options["device"])
    try:
        return _train(options, state, path, world, progress)
    finally:
        world.close()


def _train(options, state, resumed_from, world, progress):
    device, seed = world.device, options["seed"]
    precision = PRECISIONS[options["precision"]]
    if options["batch_size"] % world.world_size:
        raise ConfigError(f"--batch-size {options['batch_size']} must be divisible by the number of processes "
                          f"({world.world_size}): each rank takes batch_size / world_size samples")

    data = options["data"]
    labels, class_names = None, None
    if options["class_cond"]:
        images, labels, class_names = load_dataset(data, "train", image_size=options["image_size"], labels=True)
    else:
        images = load_dataset(data, "train", image_size=options["image_size"])
    channels, image_size = images.shape[1], images.shape[-1]
    preset = options["preset"] or ("digits" if data == "digits" else "cifar10")
    options = dict(options, preset=preset, image_size=image_size)

    config = {
        "model": model_config_for(preset, channels, image_size, options["ch"], options["ch_mult"]),
        "diffusion": dict(num_timesteps=options["timesteps"], schedule=options["schedule"],
                          prediction_type=options["prediction_type"]),
        "train": {k: v for k, v in options.items() if k not in ("device", "resume", "progress")},
    }
    if class_names is not None:  # label i names class_names[i]; label len(class_names) is the null label
        config["model"]["num_classes"] = len(class_names)
        config["class_names"] = class_names
    if state is not None:  # the network as it was built, even if its preset has changed since
        config["model"], config["diffusion"] = state["config"]["model"], state["config"]["diffusion"]
        if state["config"].get("class_names") != class_names:
            raise ckpt.CheckpointError(f"the classes of --data {data!r} ({class_names}) are not those of the "
                                       f"checkpoint {resumed_from!r} ({state['config'].get('class_names')}); "
                                       f"resume with the same data, or start a new run")

    torch.manual_seed(seed)  # the initial weights: identical on every rank
    model = build_model(config["model"], device)
    diffusion = build_diffusion(config["diffusion"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=options["lr"], weight_decay=options["weight_decay"])
    scaler = torch.amp.GradScaler(device.type, enabled=precision is torch.float16)
    ema = EMA(model, options["ema_decay"])
    ema_model = build_model(config["model"], device).eval().requires_grad_(False)
    step = 0
    if options["sample_every"]:
        check_sample_steps(diffusion, options["sampler"], options["sample_steps"], "--sample-steps")
    checkpoint_path = os.path.join(options["out"], CHECKPOINT_NAME)
    if state is not None:
        if "ema" not in state:
            raise ckpt.CheckpointError(f"checkpoint {resumed_from!r} holds no EMA weights, so it cannot be resumed "
                                       f"(sample from it with --no-ema, or start a new run)")
        ckpt.load_weights(model, state["model"], "model", resumed_from)
        ckpt.load_weights(ema, state["ema"], "EMA", resumed_from)
        try:
            optimizer.load_state_dict(state["optimizer"])
            if "scaler" in state:
                scaler.load_state_dict(state["scaler"])
            elif precision is torch.float16:
                note(f"checkpoint {resumed_from!r} holds no GradScaler state; fp16 loss scaling starts afresh")
        except (KeyError, ValueError, RuntimeError) as error:
            raise ckpt.CheckpointError(f"the optimizer state in the checkpoint does not fit: {error}") from None
        try:
            step = int(state["step"])
        except (KeyError, TypeError, ValueError):
            raise ckpt.CheckpointError(f"checkpoint {resumed_from!r} does not record its step; it cannot be "
                                       f"resumed: start a new run") from None
        try:
            ckpt.set_rng_states(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError):
            # The data, timesteps and noise of each step derive from (seed, step): the run continues
            # with the same batches, only the global generators start afresh.
            note(f"checkpoint {resumed_from!r} holds no usable random generator states; resuming without them "
                 f"(the batches and noise are the same, the run may differ slightly from an uninterrupted one)")
        if world.main:
            print(f"resuming from {resumed_from!r} at step {step} (training to step {options['steps']})",
                  file=sys.stderr, flush=True)
    if step >= options["steps"]:
        raise ConfigError(f"the checkpoint is at step {step}, --steps {options['steps']} is already reached "
                          f"(pass a larger --steps to train further)")

    train_model = model
    if world.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = StepSampler(len(images), options["batch_size"], seed, world.rank, world.world_size)
    total, last_good, loss_value = options["steps"], (checkpoint_path if state is not None else None), None
    start_step = step

    def save_checkpoint(done):
        if world.main:
            ckpt.save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                       "scaler": scaler.state_dict(), "step": done, "rng": ckpt.rng_states(), "config": config},
                      checkpoint_path, option="--out")
        world.barrier()

    def write_samples(done):
        ema.copy_to(ema_model)
        grid_model, n, nrow = ema_model, options["sample_n"], None
        if class_names is not None:  # one row per class: sample_n // K samples of each (at least one)
            nrow = max(1, n // len(class_names))
            y = torch.arange(len(class_names), device=device).repeat_interleave(nrow)
            grid_model, n = WithLabels(ema_model, y), len(y)
        samples = generate(grid_model, diffusion, n, batch_size=n, sampler=options["sampler"],
                           steps=options["sample_steps"], seed=seed, dist_info=world)
        if world.main:
            save_grid(samples, os.path.join(options["out"], SAMPLES_FOLDER, f"step_{done:07d}.png"), nrow=nrow,
                      option="--out")

    bar = None
    if progress and world.main:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)
    evaluate = _evaluator(options, ema, ema_model, diffusion, world, bar)
    model.train()
    while step < total:
        # Everything random in this step is a function of (seed, step, rank): resuming reproduces it.
        # t and the noise are drawn for the whole global batch and sliced, as the data is, so the
        # run does not depend on the number of processes; dropout differs per rank.
        indices = sampler.indices(step)
        x = images[indices].to(device, non_blocking=True)
        y = None if labels is None else labels[indices].to(device, non_blocking=True)
        generator = torch.Generator(device).manual_seed(mix_seed(seed, step))
        t = torch.randint(0, diffusion.num_timesteps, (options["batch_size"],), device=device, generator=generator)
        noise = torch.randn((options["batch_size"], *x.shape[1:]), device=device, generator=generator)
        mine = slice(world.rank * len(x), (world.rank + 1) * len(x))
        t, noise = t[mine], noise[mine]
        torch.manual_seed(mix_seed(seed, step, world.rank))  # dropout, and label dropout (per rank as well)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, options["lr"], options["warmup"])
        with torch.autocast(device.type, dtype=precision or torch.float32, enabled=precision is not None):
            loss = diffusion.p_losses(train_model, x, t, noise=noise, loss_type=options["loss_type"], y=y,
                                      cond_drop_prob=options["cond_drop_prob"] if y is not None else 0.0)
        reported = loss.detach().float()
        if world.world_size > 1:
            dist.all_reduce(reported)  # every rank sees the same value, so all stop together
            reported /= world.world_size
        loss_value = reported.item()
        if not math.isfinite(loss_value):
            kept = (f"the last good checkpoint {last_good!r} is intact" if last_good
                    else "no checkpoint was written yet")
            raise TrainingDiverged(
                f"the loss became {loss_value} at step {step + 1}; training stopped and {kept}. "
                f"Try a lower --lr (now {options['lr']}), a longer --warmup, --grad-clip 1.0, or --precision "
                f"bf16/fp32 instead of fp16, then --resume from the last checkpoint or start again.")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if options["grad_clip"]:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), options["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        ema.update(model, step)
        step += 1

        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
        if options["sample_every"] and step % options["sample_every"] == 0:
            write_samples(step)
        if evaluate is not None and step % options["eval_every"] == 0:
            evaluate(step, loss_value)
        if step == total or (options["ckpt_every"] and step % options["ckpt_every"] == 0):
            save_checkpoint(step)
            last_good = checkpoint_path
    if bar is not None:
        bar.close()
    return {"step": step, "start_step": start_step, "checkpoint": checkpoint_path, "loss": loss_value}


def _evaluator(options, ema, ema_model, diffusion, world, bar):
    """The ``--eval-every`` hook: metrics of eval_n EMA samples (the grids' sampler and steps, the
    same seed each time) against the training data, printed beside the loss and appended to
    OUT/metrics.jsonl. The feature network and the reference statistics are set up once, here,
    so a missing Inception weights file stops the run before its first step."""
    if not options["eval_every"]:
        return None
    if options["eval_n"] < 4:
        raise ConfigError(f"--eval-n must be at least 4 (precision and recall compare each sample with its 3 "
                          f"nearest neighbours), got {options['eval_n']}")
    import json

    from .metrics import MetricsError
    from .metrics.evaluation import (default_features, evaluate, feature_network, raise_on_every_rank,
                                     reference_statistics)

    config = ema_model.config
    features = default_features(config["in_channels"], config["image_size"])
    net = reference = failure = None
    if world.main:
        try:
            net = feature_network(features, device=world.device)
            reference = reference_statistics(options["data"], net, progress=bar is not None)
        except (MetricsError, DataError) as error:
            failure = error
    try:
        raise_on_every_rank(failure, world)
    except MetricsError as error:
        raise ConfigError(f"--eval-every: {error}") from None

    def run(step, loss):
        ema.copy_to(ema_model)
        try:
            result = evaluate(ema_model, diffusion, options["eval_n"], features=features, ref=options["data"],
                              batch_size=min(options["eval_n"], options["batch_size"]), dist_info=world, net=net,
                              reference=reference, sampler=options["sampler"], steps=options["sample_steps"],
                              seed=options["seed"])
        except MetricsError as error:
            raise ConfigError(f"--eval-every at step {step}: {error}") from None
        if not world.main:
            return
        kid = "n/a" if result["kid_mean"] is None else f"{result['kid_mean']:.5f} ± {result['kid_std']:.5f}"
        line = (f"step {step}: loss {loss:.4f}  FID ({features}, n={result['n']}) {result['fid']:.4f}  KID {kid}  "
                f"precision {result['precision']:.3f}  recall {result['recall']:.3f}")
        if bar is not None:
            bar.write(line)
            bar.set_postfix(loss=f"{loss:.4f}", fid=f"{result['fid']:.3f}", refresh=False)
        else:
            print(line, flush=True)
        record = {"step": step, "loss": loss, **{k: result[k] for k in ("fid", "kid_mean", "kid_std", "precision",
                                                                       "recall", "n", "features")}}
        os.makedirs(options["out"], exist_ok=True)
        with open(os.path.join(options["out"], "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    return run


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def eval_bpd(model, diffusion, images, *, batch_size=64, seed=0, clip_denoised=False, dist_info=None,
             progress=False):
    """Per-image VLB in bits/dim of ``images`` ([N, C, H, W] in [-1, 1]), sharded over ranks.

    clip_denoised: clamp the predicted x_0 in the model's means. Off by default whatever the
    diffusion's sampler defaults say (a pipeline's clip_sample), so a checkpoint and its diffusers
    export give the same bound.
    """
    rank, world = (dist_info.rank, dist_info.world_size) if dist_info else (0, 1)
    device = next(model.parameters()).device
    totals = torch.zeros(len(images), device=device)
    for b, start in enumerate(range(0, len(images), batch_size)):
        if b % world != rank:
            continue
        generator = torch.Generator(device).manual_seed(mix_seed(seed, b))
        x = images[start:start + batch_size].to(device)
        terms = diffusion.calc_bpd_loop(model, x, clip_denoised, generator=generator, progress=progress)
        totals[start:start + len(x)] = terms["total_bpd"].float()
    if world > 1:
        dist.all_reduce(totals)  # each image was filled in by exactly one rank
    return totals.cpu()


def export_diffusers(source, folder, clip=True):
    """Writes a diffusers DDPMPipeline folder (EMA weights) from a checkpoint; returns the folder.

    clip: the scheduler's clip_sample, so that diffusers' samplers clamp the predicted x_0 as
    ``ddpm-fast sample`` does by default.
    """
    from .interop.diffusers import save_diffusers_pipeline

    model, diffusion, _ = load_for_sampling(source, torch.device("cpu"))
    diffusion.sampler_defaults = dataclasses.replace(diffusion.sampler_defaults, clip_denoised=clip)
    return save_diffusers_pipeline(model, diffusion, folder)


def export_ema(source, destination, half=False, option=None):
    """Writes a sampling-only checkpoint (config + EMA weights) from a training checkpoint."""
    state = ckpt.load(source)
    if "ema" not in state:
        raise ckpt.CheckpointError(f"checkpoint {source!r} holds no EMA weights")
    check_finite_weights(state["ema"], f"checkpoint {os.fspath(source)!r}", "EMA weights")
    weights = {k: v.half() if half and v.is_floating_point() else v for k, v in state["ema"].items()}
    ckpt.save({"config": state["config"], "ema": weights, "step": state.get("step", 0)}, destination, option)


__all__ = ["train", "generate", "eval_bpd", "export_ema", "export_diffusers", "load_for_sampling", "ConfigError",
           "TrainingDiverged", "DataError"]
