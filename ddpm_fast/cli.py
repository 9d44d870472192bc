"""The ``ddpm-fast`` command: train, sample, eval, eval-bpd, export, info.

``sample``, ``eval`` and ``eval-bpd`` read a checkpoint (``--ckpt``) or a diffusers pipeline folder
(``--pipeline``); ``export`` writes a sampling checkpoint (``--out``) or a pipeline folder
(``--diffusers``).

Every error a user can cause (an option value, missing or unreadable files, a destination that
cannot be written, a full disk, a busy run folder, diverged training) ends with one
``ddpm-fast: error: ...`` line and a non-zero exit code (see :mod:`ddpm_fast.errors`, the one
place that does it); ``--debug`` shows the traceback.
"""

import argparse
import math
import os
import sys

from .errors import EXIT_ERROR, run_command

SEED_LIMIT = 2 ** 64  # torch.manual_seed takes seeds in [0, 2**64)


def _int_at_least(minimum, description):
    """An argparse type: an int >= minimum, else the message 'expected <description>, got ...'."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}")
        return value

    return parse


def _seed(text):
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**64), got {text!r}")
    return value


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help once, and only for a real default: never for
    None (the default comes from elsewhere and the help says where) or for on/off flags."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or "(default" in text:
            return text
        if isinstance(action, argparse.BooleanOptionalAction) and isinstance(action.default, bool):
            return text + f" (default: {action.option_strings[0 if action.default else 1]})"
        if action.default in (None, argparse.SUPPRESS) or isinstance(action.default, bool):
            return text
        if not action.option_strings:
            return text
        return text + " (default: %(default)s)"


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _float_in(description, low=None, high=None, open_low=False, open_high=False):
    """An argparse type: a finite float within the bounds, else 'expected <description>, got ...'."""

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = None
        ok = value is not None and math.isfinite(value)
        ok = ok and (low is None or (value > low if open_low else value >= low))
        ok = ok and (high is None or (value < high if open_high else value <= high))
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}")
        return value

    return parse


_positive_float = _float_in("a positive number", low=0.0, open_low=True)
_non_negative_float = _float_in("a number >= 0", low=0.0)
_decay = _float_in("a number in [0, 1)", low=0.0, high=1.0, open_high=True)


def _int_list(text):
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,2, got {text!r}") from None


PIPELINE_HELP = ("a diffusers DDPMPipeline folder (model_index.json, unet/, scheduler/), as written by "
                 "DDPMPipeline.save_pretrained or `ddpm-fast export --diffusers`")


def _add_sampling_options(parser):
    """The sampler options of ``sample``, shared with ``eval`` (see _sampling_options)."""
    from .train import DEFAULT_GUIDANCE, DEFAULTS, SAMPLERS

    parser.add_argument("--sampler", choices=SAMPLERS, default=DEFAULTS["sampler"],
                        help="ddpm: all T ancestral steps; ddim, dpm++2m (DPM-Solver++ 2M), dpm++3m (third "
                             "order), dpm++2m-sde (stochastic 2M): --steps steps")
    parser.add_argument("--steps", type=_positive_int, default=None,
                        help=f"steps of ddim and the dpm++ samplers (default: {DEFAULTS['sample_steps']}, or fewer "
                             f"when the model's schedule cannot place that many)")
    parser.add_argument("--eta", type=_non_negative_float, default=0.0,
                        help="DDIM eta (0 = deterministic, 1 = DDPM-like)")
    parser.add_argument("--class", dest="class_", metavar="K",
                        help="a class-conditional model's class (its index or name), or 'all' for every class in "
                             "turn, one grid row each (default: unconditional samples)")
    parser.add_argument("--guidance", type=_float_in("a finite number"), default=DEFAULT_GUIDANCE,
                        help="classifier-free guidance scale with --class: 1 = the conditional model alone, 0 = "
                             "the unconditional one, above 1 = further from it")
    # No default here: it depends on the source (see _sampling_options); SUPPRESS leaves it out of args.
    parser.add_argument("--clip", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                        help="clamp the predicted x_0 to [-1, 1] at every step (default: on for --ckpt; for "
                             "--pipeline the scheduler's clip_sample)")
    parser.add_argument("--seed", type=_seed, default=0, help="seed of the samples")
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="samples per forward pass")


def _sampling_options(args, model, diffusion, state):
    """(generate()'s keyword arguments, samples per grid row) from the options of _add_sampling_options."""
    from .train import check_sample_steps, sample_labels

    check_sample_steps(diffusion, args.sampler, args.steps, "--steps")
    class_names = state["config"].get("class_names") if state else None
    labels, nrow = sample_labels(args.class_, args.n, model, class_names)
    # --clip's default: on for checkpoints (better samples), the scheduler's clip_sample for a
    # pipeline (what diffusers' own samplers would do with it).
    clip = getattr(args, "clip", diffusion.sampler_defaults.clip_denoised if args.pipeline else True)
    return dict(sampler=args.sampler, steps=args.steps, eta=args.eta, seed=args.seed, clip=clip, y=labels,
                guidance_scale=args.guidance if labels is not None else 1.0), nrow


def _add_eval_parser(commands):
    evaluation = commands.add_parser(
        "eval", help="FID, KID and precision/recall of N samples against reference data (docs/metrics.md)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = evaluation.add_mutually_exclusive_group()
    source.add_argument("--ckpt", help="checkpoint (default: the shipped digits model)")
    source.add_argument("--pipeline", metavar="DIR", help=PIPELINE_HELP)
    evaluation.add_argument("--n", "--num-samples", dest="n", type=_positive_int, default=1000,
                            help="number of samples (FID and KID are biased upwards at small N: compare models at "
                                 "the same N; 10000 or 50000 for numbers to publish)")
    # SUPPRESS: the defaults depend on the model, which the help says (read with getattr in _run_eval).
    evaluation.add_argument("--features", choices=["inception", "digits"], default=argparse.SUPPRESS,
                            help="feature network (default: digits for 8x8 grey images, else inception)")
    evaluation.add_argument("--ref", default=argparse.SUPPRESS,
                            help="'digits' (its training split), a folder of images or of CIFAR-10 batches, or a "
                                 "statistics .npz with mu/sigma (FID only) (default: the checkpoint's training "
                                 "data; required with --pipeline)")
    _add_sampling_options(evaluation)
    evaluation.add_argument("--json", metavar="OUT", help="write the numbers and settings to this JSON file")
    evaluation.add_argument("--inception-weights", metavar="PATH",
                            help="the FID Inception weights file (default: looked for in the torch hub cache)")
    evaluation.add_argument("--download-weights", action="store_true",
                            help="download the Inception weights into the torch hub cache when missing")
    evaluation.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                            help="use the EMA weights (checkpoints only)")
    evaluation.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    evaluation.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                            help="progress bars for sampling and feature extraction")


def build_parser():
    from .nn.unet import UNet
    from .train import DEFAULTS, SAMPLERS

    parser = argparse.ArgumentParser(prog="ddpm-fast", description="Fast DDPM training and sampling.",
                                     epilog="Errors end with one 'ddpm-fast: error: ...' line and exit code 1 "
                                            "(2: invalid options); --debug shows the traceback.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of any error (also after the "
                                                             "command)")
    commands = parser.add_subparsers(dest="command", metavar="{train,sample,eval,eval-bpd,export,info}")

    # Defaults of train are None where they come from the preset, the data or (on --resume) the checkpoint.
    train = commands.add_parser("train", help="train a model (default: the 8x8 digits model from scratch)",
                                formatter_class=_HelpFormatter)
    train.add_argument("--data", default=None, help="'digits', a folder of PNG/JPEG images, or a folder with "
                                                    "CIFAR-10's python batches (default: digits)")
    train.add_argument("--image-size", type=_positive_int, help="resize images to this size (default: the data's)")
    train.add_argument("--class-cond", action="store_true", default=None,
                       help="class-conditional model: the digits' labels, or an image folder's subfolders as "
                            "classes (sorted names; torchvision's ImageFolder convention)")
    train.add_argument("--cond-drop-prob", type=_float_in("a number in [0, 1]", low=0.0, high=1.0),
                       help="--class-cond: probability of replacing a label by the null label, for "
                            "classifier-free guidance (default 0.1)")
    train.add_argument("--preset", choices=sorted(UNet.PRESETS),
                       help="UNet preset (default: digits for digits, cifar10 otherwise)")
    train.add_argument("--ch", type=_positive_int, help="UNet base width (default: the preset's)")
    train.add_argument("--ch-mult", type=_int_list, help="UNet width multipliers per level, e.g. 1,2 "
                                                         "(default: the preset's)")
    def default(name, fmt=""):
        return f"(default: {DEFAULTS[name]:{fmt}})"

    train.add_argument("--steps", type=_positive_int, help=f"total optimizer steps {default('steps')}")
    train.add_argument("--batch-size", type=_positive_int,
                       help=f"global batch size, split over processes {default('batch_size')}")
    train.add_argument("--lr", type=_positive_float, help=f"peak AdamW learning rate {default('lr', 'g')}")
    train.add_argument("--warmup", type=_non_negative_int,
                       help=f"linear learning-rate warm-up steps {default('warmup')}")
    train.add_argument("--weight-decay", type=_non_negative_float,
                       help=f"AdamW weight decay {default('weight_decay', 'g')}")
    train.add_argument("--grad-clip", type=_non_negative_float,
                       help=f"clip the gradient norm to this, 0 = off {default('grad_clip', 'g')}")
    train.add_argument("--timesteps", type=_positive_int, help=f"diffusion steps T {default('timesteps')}")
    train.add_argument("--schedule", choices=["linear", "cosine"], help=f"beta schedule {default('schedule')}")
    train.add_argument("--prediction-type", choices=["epsilon", "x0", "v"],
                       help=f"model target {default('prediction_type')}")
    train.add_argument("--loss", dest="loss_type", choices=["mse", "l1", "vlb"],
                       help=f"training loss {default('loss_type')}")
    train.add_argument("--ema-decay", type=_decay, help=f"EMA decay of the weights {default('ema_decay', 'g')}")
    train.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                       help=f"autocast precision; fp16 uses a GradScaler {default('precision')}")
    train.add_argument("--out", help=f"output folder for checkpoint.pt and samples/, used by one run at a time "
                                     f"{default('out')}")
    train.add_argument("--sample-every", type=_non_negative_int,
                       help=f"write a sample grid every N steps, 0 = never {default('sample_every')}")
    train.add_argument("--sample-n", type=_positive_int, help=f"images per sample grid {default('sample_n')}")
    train.add_argument("--sampler", choices=SAMPLERS, help=f"sampler for the grids {default('sampler')}")
    train.add_argument("--sample-steps", type=_positive_int,
                       help=f"ddim / dpm++ steps for the grids {default('sample_steps')}")
    train.add_argument("--eval-every", type=_non_negative_int,
                       help="every N steps, FID/KID/precision/recall of --eval-n EMA samples against the training "
                            "data (0 = never, the default); costs --eval-n x --sample-steps model evaluations plus "
                            "the features each time, the reference statistics once (cached)")
    train.add_argument("--eval-n", type=_positive_int,
                       help=f"samples per evaluation {default('eval_n')}: small and quick, so FID and KID are "
                            f"biased upwards; compare runs at the same --eval-n")
    train.add_argument("--ckpt-every", type=_non_negative_int,
                       help=f"write checkpoint.pt every N steps and at the end, 0 = only at the end "
                            f"{default('ckpt_every')}")
    train.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                       help="continue from CKPT (CKPT left out: OUT/checkpoint.pt)")
    train.add_argument("--seed", type=_seed, help=f"seed of the weights, data order and noise {default('seed')}")
    train.add_argument("--device", help=f"auto, cpu, cuda or cuda:N; torchrun: cuda:LOCAL_RANK {default('device')}")
    train.add_argument("--no-progress", dest="progress", action="store_false",
                       help="no progress bar (default: show one)")

    sample = commands.add_parser("sample", help="draw a grid of samples (default: the shipped digits model)",
                                 formatter_class=_HelpFormatter)
    source = sample.add_mutually_exclusive_group()
    source.add_argument("--ckpt", help="checkpoint (default: the digits model shipped with ddpm_fast)")
    source.add_argument("--pipeline", metavar="DIR", help=PIPELINE_HELP)
    # --num-samples spells --n out: torchrun takes a bare --n for one of its own options.
    sample.add_argument("--n", "--num-samples", dest="n", type=_positive_int, default=64, help="number of samples")
    _add_sampling_options(sample)
    sample.add_argument("--out", default="samples.png", help="PNG grid to write")
    sample.add_argument("--npz", help="also save the raw samples to this .npz file")
    sample.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="use the EMA weights (checkpoints only)")
    sample.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    sample.add_argument("--progress", action="store_true", help="show a progress bar per batch")

    _add_eval_parser(commands)

    bpd = commands.add_parser("eval-bpd", help="variational bound in bits/dim on held-out data",
                              formatter_class=_HelpFormatter)
    source = bpd.add_mutually_exclusive_group()
    source.add_argument("--ckpt", help="checkpoint (default: the shipped digits model)")
    source.add_argument("--pipeline", metavar="DIR", help=PIPELINE_HELP)
    bpd.add_argument("--data", help="data as for train (default: the checkpoint's training data; required with "
                                    "--pipeline)")
    bpd.add_argument("--split", choices=["test", "train"], default="test",
                     help="held-out (test) or training images")
    bpd.add_argument("--n", "--num-images", dest="n", type=_positive_int,
                     help="evaluate only the first N images (default: all)")
    bpd.add_argument("--batch-size", type=_positive_int, default=128, help="images per batch")
    bpd.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                     help="use the EMA weights (checkpoints only)")
    bpd.add_argument("--seed", type=_seed, default=0, help="seed of the noise")
    bpd.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    bpd.add_argument("--progress", action="store_true", help="show a progress bar per batch")

    export = commands.add_parser("export", help="write a small sampling-only checkpoint (config + EMA weights) "
                                                "or a diffusers pipeline folder", formatter_class=_HelpFormatter)
    export.add_argument("--ckpt", required=True, help="training checkpoint")
    target = export.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="sampling checkpoint file to write")
    target.add_argument("--diffusers", metavar="DIR",
                        help="write a diffusers DDPMPipeline folder (EMA weights; model_index.json, unet/, "
                             "scheduler/) that diffusers.DDPMPipeline.from_pretrained(DIR) loads")
    export.add_argument("--half", action="store_true", help="--out: store the weights in float16 (half the size)")
    export.add_argument("--clip", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                        help="--diffusers: the scheduler's clip_sample, whether diffusers' samplers clamp the "
                             "predicted x_0 to [-1, 1] (default: on, as ddpm-fast sample does)")

    commands.add_parser("info", help="versions, device and available backends")
    for command in commands.choices.values():  # --debug after the command too; SUPPRESS keeps an earlier one
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of any error")
    return parser


def _run_train(args):
    from .train import train

    options = {k: v for k, v in vars(args).items() if k not in ("command", "debug")}
    result = train(**options)
    if int(os.environ.get("RANK", "0")) == 0:
        resumed = f", resumed at step {result['start_step']}" if result.get("start_step") else ""
        print(f"trained to step {result['step']} (last loss {result['loss']:.4f}{resumed}); "
              f"checkpoint: {result['checkpoint']}")


def _load_model(args, device):
    """(model, diffusion, checkpoint state or None) from --pipeline or --ckpt (default: the shipped model)."""
    from . import checkpoint
    from .train import ConfigError, check_finite_weights, load_for_sampling

    if args.pipeline:
        from .interop.diffusers import load_diffusers_pipeline

        if not args.ema:
            raise ConfigError("--no-ema applies to checkpoints; a pipeline folder holds one set of weights")
        model, diffusion = load_diffusers_pipeline(args.pipeline)
        check_finite_weights(model, f"pipeline folder {args.pipeline!r}")
        return model.to(device), diffusion, None
    return load_for_sampling(args.ckpt or checkpoint.shipped_path(), device, use_ema=args.ema)


def _run_sample(args):
    from .fileio import check_output_file
    from .images import save_grid, save_npz
    from .train import Dist, generate

    check_output_file(args.out, "--out")
    if args.npz:
        check_output_file(args.npz, "--npz")
    world = Dist(args.device)
    try:
        model, diffusion, state = _load_model(args, world.device)
        options, nrow = _sampling_options(args, model, diffusion, state)
        samples = generate(model, diffusion, args.n, batch_size=args.batch_size, dist_info=world,
                           progress=args.progress and world.main, **options)
        if world.main:
            save_grid(samples, args.out, nrow=nrow, option="--out")
            if args.npz:
                save_npz(samples, args.npz, option="--npz", labels=options["y"])
            print(f"wrote {args.n} samples to {args.out}" + (f" and {args.npz}" if args.npz else ""))
    finally:
        world.close()


def _run_eval(args):
    import json

    from .images import atomic_write
    from .metrics import MetricsError
    from .metrics.evaluation import evaluate, format_table
    from .train import ConfigError, Dist

    given_ref, features = getattr(args, "ref", None), getattr(args, "features", None)
    if args.pipeline and not given_ref:
        raise ConfigError("eval --pipeline needs --ref: a pipeline folder does not record its training data")
    world = Dist(args.device)
    try:
        model, diffusion, state = _load_model(args, world.device)
        ref = given_ref or (state["config"].get("train", {}).get("data") or "digits")
        options, _ = _sampling_options(args, model, diffusion, state)
        result = evaluate(model, diffusion, args.n, features=features, ref=ref, batch_size=args.batch_size,
                          inception_weights=args.inception_weights, download=args.download_weights,
                          dist_info=world, progress=args.progress and world.main, **options)
        if world.main:
            result["model"] = args.pipeline or args.ckpt or "shipped digits model"
            result["class"] = args.class_
            print(f"{result['n']} samples of {result['model']} ({args.sampler}"
                  f"{'' if args.sampler == 'ddpm' else f', {args.steps} steps'}) against {ref}, "
                  f"{result['features']} features:")
            print(format_table(result))
            if args.json:
                text = json.dumps(result, indent=2, sort_keys=True) + "\n"
                atomic_write(args.json, lambda f: f.write(text.encode()))
                print(f"wrote {args.json}")
    except MetricsError as error:
        raise ConfigError(str(error)) from None
    finally:
        world.close()


def _run_eval_bpd(args):
    from .data import load_dataset
    from .train import ConfigError, Dist, eval_bpd

    if args.pipeline and not args.data:
        raise ConfigError("eval-bpd --pipeline needs --data: a pipeline folder does not record its training data")
    world = Dist(args.device)
    try:
        model, diffusion, state = _load_model(args, world.device)
        trained_on = None if state is None else state["config"].get("train", {}).get("data", "digits")
        config = model.config
        images = load_dataset(args.data or trained_on, args.split, image_size=config["image_size"],
                              channels=config["in_channels"])
        if args.n:
            images = images[:args.n]
        bpd = eval_bpd(model, diffusion, images, batch_size=args.batch_size, seed=args.seed, dist_info=world,
                       progress=args.progress and world.main)
        if world.main:
            stderr = bpd.std().item() / len(bpd) ** 0.5 if len(bpd) > 1 else float("nan")
            print(f"{bpd.mean().item():.4f} bits/dim (± {stderr:.4f} standard error) on {len(bpd)} "
                  f"{args.split} images of {args.data or trained_on}")
    finally:
        world.close()


def _run_export(args):
    from .fileio import check_output_file, check_output_folder
    from .train import ConfigError, export_diffusers, export_ema

    if args.diffusers:
        if args.half:
            raise ConfigError("--half applies to --out; a diffusers folder keeps the float32 weights")
        check_output_folder(args.diffusers, "--diffusers")
        export_diffusers(args.ckpt, args.diffusers, clip=getattr(args, "clip", True))
        print(f"wrote the diffusers pipeline folder {args.diffusers}")
        return
    if hasattr(args, "clip"):
        raise ConfigError("--clip/--no-clip apply to --diffusers (the exported scheduler's clip_sample)")
    check_output_file(args.out, "--out")
    export_ema(args.ckpt, args.out, half=args.half, option="--out")
    print(f"wrote {args.out}")


def main(argv=None):
    """Runs the command line; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_ERROR
    if args.command == "info":
        from .info import main as info_main

        return info_main()

    run = {"train": _run_train, "sample": _run_sample, "eval": _run_eval, "eval-bpd": _run_eval_bpd,
           "export": _run_export}
    return run_command(lambda: run[args.command](args), debug=getattr(args, "debug", False))


if __name__ == "__main__":
    sys.exit(main())
