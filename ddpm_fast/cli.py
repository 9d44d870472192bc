"""The ``ddpm-fast`` command: train, sample, eval, eval-bpd, export, info.

``sample``, ``eval`` and ``eval-bpd`` read a checkpoint (``--ckpt``) or a diffusers pipeline folder
(``--pipeline``); ``export`` writes a sampling checkpoint (``--out``) or a pipeline folder
(``--diffusers``).

Every user error (bad option value, missing data, unreadable checkpoint, diverged training)
ends with one ``ddpm-fast: error: ...`` line and a non-zero exit code, never a traceback.
"""

import argparse
import math
import os
import sys

EXIT_ERROR = 1


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
    from .train import DEFAULTS, SAMPLERS

    parser.add_argument("--sampler", choices=SAMPLERS, default=DEFAULTS["sampler"],
                        help="ddpm: all T ancestral steps; ddim, dpm++2m (DPM-Solver++ 2M): --steps steps")
    parser.add_argument("--steps", type=_positive_int, default=DEFAULTS["sample_steps"],
                        help="steps of ddim and dpm++2m")
    parser.add_argument("--eta", type=_non_negative_float, default=0.0,
                        help="DDIM eta (0 = deterministic, 1 = DDPM-like)")
    # No default here: it depends on the source (see _sampling_options); SUPPRESS leaves it out of args.
    parser.add_argument("--clip", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                        help="clamp the predicted x_0 to [-1, 1] at every step (default: on for --ckpt; for "
                             "--pipeline the scheduler's clip_sample)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples")
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="samples per forward pass")


def _sampling_options(args, diffusion):
    """generate()'s keyword arguments from the options of _add_sampling_options."""
    # --clip's default: on for checkpoints (better samples), the scheduler's clip_sample for a
    # pipeline (what diffusers' own samplers would do with it).
    clip = getattr(args, "clip", diffusion.sampler_defaults.clip_denoised if args.pipeline else True)
    return dict(sampler=args.sampler, steps=args.steps, eta=args.eta, seed=args.seed, clip=clip)


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

    parser = argparse.ArgumentParser(prog="ddpm-fast", description="Fast DDPM training and sampling.")
    commands = parser.add_subparsers(dest="command", metavar="{train,sample,eval,eval-bpd,export,info}")

    # Defaults of train are None where they come from the preset, the data or (on --resume) the checkpoint.
    train = commands.add_parser("train", help="train a model (default: the 8x8 digits model from scratch)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--data", default=None, help="'digits' (default), a folder of PNG/JPEG images, or a folder "
                                                    "with CIFAR-10's python batches")
    train.add_argument("--image-size", type=_positive_int, help="resize images to this size (default: the data's)")
    train.add_argument("--preset", choices=sorted(UNet.PRESETS),
                       help="UNet preset (default: digits for digits, cifar10 otherwise)")
    train.add_argument("--ch", type=_positive_int, help="UNet base width (default: the preset's)")
    train.add_argument("--ch-mult", type=_int_list, help="UNet width multipliers per level, e.g. 1,2 "
                                                         "(default: the preset's)")
    train.add_argument("--steps", type=_positive_int, help="total optimizer steps (default 5000)")
    train.add_argument("--batch-size", type=_positive_int, help="global batch size, split over processes "
                                                               "(default 128)")
    train.add_argument("--lr", type=_positive_float, help="peak AdamW learning rate (default 2e-4)")
    train.add_argument("--warmup", type=_non_negative_int, help="linear learning-rate warm-up steps (default 500)")
    train.add_argument("--weight-decay", type=_non_negative_float, help="AdamW weight decay (default 0)")
    train.add_argument("--grad-clip", type=_non_negative_float,
                       help="clip the gradient norm to this (0 = off, default 1)")
    train.add_argument("--timesteps", type=_positive_int, help="diffusion steps T (default 1000)")
    train.add_argument("--schedule", choices=["linear", "cosine"], help="beta schedule (default linear)")
    train.add_argument("--prediction-type", choices=["epsilon", "x0", "v"], help="model target (default epsilon)")
    train.add_argument("--loss", dest="loss_type", choices=["mse", "l1", "vlb"], help="training loss (default mse)")
    train.add_argument("--ema-decay", type=_decay, help="EMA decay of the weights (default 0.9999)")
    train.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                       help="autocast precision; fp16 uses a GradScaler (default fp32)")
    train.add_argument("--out", help="output folder for checkpoint.pt and samples/ (default runs/ddpm)")
    train.add_argument("--sample-every", type=_non_negative_int, help="write a sample grid every N steps "
                                                                     "(0 = never, default 1000)")
    train.add_argument("--sample-n", type=_positive_int, help="images per sample grid (default 64)")
    train.add_argument("--sampler", choices=SAMPLERS, help=f"sampler for the grids (default {DEFAULTS['sampler']})")
    train.add_argument("--sample-steps", type=_positive_int,
                       help=f"ddim / dpm++2m steps for the grids (default {DEFAULTS['sample_steps']})")
    train.add_argument("--eval-every", type=_non_negative_int,
                       help="every N steps, FID/KID/precision/recall of --eval-n EMA samples against the training "
                            "data (0 = never, default); costs --eval-n x --sample-steps model evaluations plus "
                            "the features each time, the reference statistics once (cached)")
    train.add_argument("--eval-n", type=_positive_int,
                       help=f"samples per evaluation (default {DEFAULTS['eval_n']}: small and quick, so FID and "
                            f"KID are biased upwards; compare runs at the same --eval-n)")
    train.add_argument("--ckpt-every", type=_non_negative_int, help="write checkpoint.pt every N steps and at "
                                                                   "the end (0 = only at the end, default 1000)")
    train.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                       help="continue from CKPT (default: OUT/checkpoint.pt)")
    train.add_argument("--seed", type=int, help="seed of the weights, data order and noise (default 0)")
    train.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto; torchrun: cuda:LOCAL_RANK)")
    train.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    sample = commands.add_parser("sample", help="draw a grid of samples (default: the shipped digits model)",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    bpd.add_argument("--seed", type=int, default=0, help="seed of the noise")
    bpd.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    bpd.add_argument("--progress", action="store_true", help="show a progress bar per batch")

    export = commands.add_parser("export", help="write a small sampling-only checkpoint (config + EMA weights) "
                                                "or a diffusers pipeline folder")
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
    return parser


def _run_train(args):
    from .train import train

    options = {k: v for k, v in vars(args).items() if k not in ("command",)}
    result = train(**options)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained to step {result['step']} (last loss {result['loss']:.4f}); checkpoint: {result['checkpoint']}")


def _load_model(args, device):
    """(model, diffusion, checkpoint state or None) from --pipeline or --ckpt (default: the shipped model)."""
    from . import checkpoint
    from .train import ConfigError, load_for_sampling

    if args.pipeline:
        from .interop.diffusers import load_diffusers_pipeline

        if not args.ema:
            raise ConfigError("--no-ema applies to checkpoints; a pipeline folder holds one set of weights")
        model, diffusion = load_diffusers_pipeline(args.pipeline)
        return model.to(device), diffusion, None
    return load_for_sampling(args.ckpt or checkpoint.shipped_path(), device, use_ema=args.ema)


def _run_sample(args):
    from .images import save_grid, save_npz
    from .train import Dist, generate

    world = Dist(args.device)
    try:
        model, diffusion, _ = _load_model(args, world.device)
        samples = generate(model, diffusion, args.n, batch_size=args.batch_size, dist_info=world,
                           progress=args.progress and world.main, **_sampling_options(args, diffusion))
        if world.main:
            save_grid(samples, args.out)
            if args.npz:
                save_npz(samples, args.npz)
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
        options = _sampling_options(args, diffusion)
        result = evaluate(model, diffusion, args.n, features=features, ref=ref, batch_size=args.batch_size,
                          inception_weights=args.inception_weights, download=args.download_weights,
                          dist_info=world, progress=args.progress and world.main, **options)
        if world.main:
            result["model"] = args.pipeline or args.ckpt or "shipped digits model"
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
    from .train import ConfigError, export_diffusers, export_ema

    if args.diffusers:
        if args.half:
            raise ConfigError("--half applies to --out; a diffusers folder keeps the float32 weights")
        export_diffusers(args.ckpt, args.diffusers, clip=getattr(args, "clip", True))
        print(f"wrote the diffusers pipeline folder {args.diffusers}")
        return
    if hasattr(args, "clip"):
        raise ConfigError("--clip/--no-clip apply to --diffusers (the exported scheduler's clip_sample)")
    export_ema(args.ckpt, args.out, half=args.half)
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

    from .backends import BackendUnavailableError
    from .checkpoint import CheckpointError
    from .data import DataError
    from .interop.diffusers import DiffusersFormatError
    from .train import ConfigError, TrainingDiverged

    run = {"train": _run_train, "sample": _run_sample, "eval": _run_eval, "eval-bpd": _run_eval_bpd,
           "export": _run_export}
    try:
        run[args.command](args)
    except (DataError, CheckpointError, ConfigError, TrainingDiverged, BackendUnavailableError,
            DiffusersFormatError) as error:
        rank = os.environ.get("RANK")
        prefix = f"ddpm-fast: error (rank {rank}): " if rank not in (None, "0") else "ddpm-fast: error: "
        print(prefix + str(error), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("ddpm-fast: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
