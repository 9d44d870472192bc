"""Sample quality against cost of every sampler on the shipped digits model (the CLI's default choice).

    python benchmarks/sampler_quality.py [--n 1000] [--out benchmarks/results/sampler-quality-cpu.md]

For each sampler and step count it draws N samples from the same starting noise and reports:

* digits FID: the FID on the features of ddpm_fast's digits feature network (docs/metrics.md),
  samples against the training split's statistics, as ``ddpm-fast eval`` computes it by
  default. Lower is better. Its floor row: 808 training digits against the other 809. It is
  specific to that network: not comparable with an Inception FID.
* precision / recall (k = 3) on the same features, the samples against N training digits.
* FD (pixels): the Frechet distance between the samples and the 1797 real digits, on the 64
  raw pixels (the FID formula without an Inception network; 8x8 digits need none). Lower is
  better. The first row is its floor: N real digits against the other 1797 - N.
* confident: the share of samples that a logistic-regression digit classifier, trained on the
  real digits, assigns to one class with probability > 0.9 (legible digits).
* ODE error: for the deterministic samplers (DDIM eta 0, DPM-Solver++), the RMS distance of
  an unclipped run to a 200-step DPM-Solver++ 2M solution of the probability-flow ODE from the
  same x_T, on the first --ode-n of the N starting points (a second-order solver: its own error
  is far below the others'). Clipping x_0
  changes the ODE, so this column alone is computed without it.
* seconds for the N samples (with clipping) on this machine, and the number of model evaluations.
"""

import argparse
import pathlib
import platform
import time

import numpy as np
import torch
from scipy import linalg
from sklearn.linear_model import LogisticRegression

from ddpm_fast import checkpoint, metrics
from ddpm_fast.data import load_dataset
from ddpm_fast.metrics.evaluation import extract_features
from ddpm_fast.train import load_for_sampling

SAMPLERS = [("ddim", 10), ("ddim", 20), ("ddim", 50), ("ddim", 100),
            ("dpm++2m", 10), ("dpm++2m", 15), ("dpm++2m", 20), ("dpm++2m", 25), ("dpm++2m", 50), ("ddpm", 1000)]


def frechet_distance(a, b):
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)) of two [N, D] float64 arrays."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    # The corner pixels of the digits are always 0, so the covariances are singular: a small
    # ridge makes the matrix square root well defined (as pytorch-fid does for singular cases).
    ridge = 1e-6 * np.eye(a.shape[1])
    cov_a, cov_b = np.cov(a, rowvar=False) + ridge, np.cov(b, rowvar=False) + ridge
    root = linalg.sqrtm(cov_a @ cov_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


def draw(model, diffusion, sampler, steps, x_T, clip=True):
    start = time.perf_counter()
    with torch.no_grad():
        if sampler == "ddpm":
            x = diffusion.p_sample_loop(model, x_T.shape, x_T=x_T, generator=torch.Generator().manual_seed(1),
                                        clip_denoised=clip)
        elif sampler == "ddim":
            x = diffusion.ddim_sample_loop(model, x_T.shape, num_steps=steps, x_T=x_T, clip_denoised=clip)
        else:
            x = diffusion.dpm_solver_sample_loop(model, x_T.shape, num_steps=steps, x_T=x_T, clip_denoised=clip)
    return x, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="samples per sampler")
    parser.add_argument("--ode-n", type=int, default=200, help="samples for the ODE error column")
    parser.add_argument("--out", help="also write the markdown table here (rewritten after every row)")
    parser.add_argument("--only", help="measure only these rows, e.g. ddpm:1000,dpm++2m:20 (default: all)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    samplers = SAMPLERS
    if args.only:
        samplers = [(name, int(steps)) for name, steps in (item.split(":") for item in args.only.split(","))]
    torch.manual_seed(0)
    model, diffusion, _ = load_for_sampling(checkpoint.shipped_path(), torch.device("cpu"))
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    real = torch.cat([train, test]).flatten(1).double().numpy()
    classifier = LogisticRegression(max_iter=2000).fit(train.flatten(1).numpy(), _labels(train))
    net = metrics.DigitsFeatures()
    train_features = extract_features(net, train)
    reference = metrics.feature_statistics(train_features)
    pr_real = train_features[torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:args.n].numpy()]
    x_T = torch.randn(args.n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    if any(sampler != "ddpm" for sampler, _ in samplers):
        ode, _ = draw(model, diffusion, "dpm++2m", 200, x_T[:args.ode_n], clip=False)

    shuffled = torch.randperm(len(real), generator=torch.Generator().manual_seed(0)).numpy()
    some, others = real[shuffled[:args.n]], real[shuffled[args.n:]]
    halves = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).numpy()
    half_a, half_b = train_features[halves[:len(train) // 2]], train_features[halves[len(train) // 2:]]
    floor = metrics.frechet_distance(*metrics.feature_statistics(half_a), *metrics.feature_statistics(half_b))
    floor_pr = metrics.precision_recall(half_a, half_b)
    rows = [f"| real digits ({args.n} vs the other {len(others)}) | - | - | - | - | "
            f"{frechet_distance(some, others):.2f} | {_confident(classifier, torch.from_numpy(some)):.1%} | - | - |",
            f"| training digits ({len(half_a)} vs the other {len(half_b)}) | - | - | {floor:.3f} | "
            f"{floor_pr[0]:.3f} / {floor_pr[1]:.3f} | - | - | - | - |"]

    def table():
        return "\n".join([
            f"Shipped digits model, {args.n} samples from the same x_T, clip on (the CLI's default) except for "
            f"the ODE error ({args.ode_n} samples), "
            f"{platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads.",
            "",
            "| sampler | steps | model evaluations | digits FID | precision / recall | FD (pixels) vs real | "
            "confident | ODE error | seconds |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
        ])

    for sampler, steps in samplers:
        samples, seconds = draw(model, diffusion, sampler, steps, x_T)
        samples = samples.clamp(-1, 1)
        flat = samples.flatten(1).double().numpy()
        features = extract_features(net, samples)
        fid = metrics.frechet_distance(*metrics.feature_statistics(features), *reference)
        precision, recall = metrics.precision_recall(features, pr_real)
        ode_error = "-"
        if sampler != "ddpm":
            unclipped, _ = draw(model, diffusion, sampler, steps, x_T[:args.ode_n], clip=False)
            ode_error = f"{(unclipped - ode).pow(2).mean().sqrt().item():.4f}"
        rows.append(f"| {sampler} | {steps} | {steps} | {fid:.3f} | {precision:.3f} / {recall:.3f} | "
                    f"{frechet_distance(flat, real):.2f} | {_confident(classifier, samples):.1%} | {ode_error} | "
                    f"{seconds:.1f} |")
        print(rows[-1], flush=True)
        if args.out:
            pathlib.Path(args.out).write_text(table() + "\n")
    print(table())


def _labels(images):
    """The digit labels of load_dataset('digits', ...)'s images, found by matching the raw data."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    raw = torch.from_numpy(digits.images.astype(np.float32) / 8.0 - 1.0)  # as ddpm_fast.data scales them
    index = {tuple(image.flatten().tolist()): label for image, label in zip(raw, digits.target)}
    return np.array([index[tuple(image.flatten().tolist())] for image in images[:, 0]])


def _confident(classifier, images):
    probabilities = classifier.predict_proba(images.flatten(1).double().numpy())
    return float((probabilities.max(1) > 0.9).mean())


if __name__ == "__main__":
    main()
