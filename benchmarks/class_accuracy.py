"""Class accuracy of a class-conditional digits model (default: the shipped one).

    python benchmarks/class_accuracy.py [--ckpt PATH] [--n 100] [--out benchmarks/results/class-accuracy-cpu.md]

For each class it draws N samples conditioned on that class (guidance scale 1: the conditional
model alone, ``model(x, t, y=class)``) with DPM-Solver++ 2M at 20 steps and DDIM at 50, and
reports the share that a logistic-regression digit classifier, trained on the real training
digits, assigns to the requested class. Unconditional samples (the null label, ``model(x, t)``)
are checked as benchmarks/sampler_quality.py checks the samplers: the share the classifier
assigns to one class with probability > 0.9, and how the classes spread. Clip on, as
``ddpm-fast sample``.
"""

import argparse
import pathlib

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from ddpm_fast import checkpoint
from ddpm_fast.conditioning import WithLabels
from ddpm_fast.data import load_dataset
from ddpm_fast.train import load_for_sampling

SAMPLERS = [("dpm++2m", 20), ("ddim", 50)]


def draw(model, diffusion, sampler, steps, x_T):
    with torch.no_grad():
        if sampler == "ddim":
            x = diffusion.ddim_sample_loop(model, x_T.shape, num_steps=steps, x_T=x_T, clip_denoised=True)
        else:
            x = diffusion.dpm_solver_sample_loop(model, x_T.shape, num_steps=steps, x_T=x_T, clip_denoised=True)
    return x.clamp(-1, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=checkpoint.shipped_path(), help="class-conditional digits checkpoint")
    parser.add_argument("--n", type=int, default=100, help="samples per class")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args()
    model, diffusion, state = load_for_sampling(args.ckpt, torch.device("cpu"))
    names = state["config"].get("class_names")
    if model.num_classes is None or names is None:
        raise SystemExit(f"{args.ckpt} is not a class-conditional model")
    images, labels, real_names = load_dataset("digits", "train", labels=True)
    assert names == real_names, (names, real_names)
    classifier = LogisticRegression(max_iter=2000).fit(images.flatten(1).numpy(), labels.numpy())
    test_images, test_labels, _ = load_dataset("digits", "test", labels=True)
    held_out = (classifier.predict(test_images.flatten(1).numpy()) == test_labels.numpy()).mean()

    K = model.num_classes
    y = torch.arange(K).repeat_interleave(args.n)
    x_T = torch.randn(len(y), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    lines = [f"Class accuracy of {pathlib.Path(args.ckpt).name} (step {state.get('step')}), {args.n} samples per "
             f"class, guidance scale 1, clip on. Classifier: logistic regression on the {len(images)} training "
             f"digits ({held_out:.1%} on the {len(test_images)} held-out ones).", "",
             "| sampler | " + " | ".join(names) + " | all |", "|---|" + "---:|" * (K + 1)]
    for sampler, steps in SAMPLERS:
        samples = torch.cat([draw(WithLabels(model, y[i:i + 200]), diffusion, sampler, steps, x_T[i:i + 200])
                             for i in range(0, len(y), 200)])
        predicted = classifier.predict(samples.flatten(1).double().numpy())
        hits = predicted == y.numpy()
        per_class = [hits[y.numpy() == k].mean() for k in range(K)]
        lines.append(f"| {sampler} {steps} | " + " | ".join(f"{a:.0%}" for a in per_class) + f" | {hits.mean():.1%} |")
        print(lines[-1], flush=True)

    n_uncond = args.n * 4
    x_T = torch.randn(n_uncond, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    lines += ["", "Unconditional (the null label): share of samples the classifier assigns to one class with "
              "probability > 0.9, and the classes it assigns.", "",
              "| sampler | samples | confident | " + " | ".join(names) + " |", "|---|---:|---:|" + "---:|" * K]
    real_confident = (classifier.predict_proba(test_images.flatten(1).numpy()).max(1) > 0.9).mean()
    for sampler, steps in SAMPLERS:
        samples = torch.cat([draw(model, diffusion, sampler, steps, x_T[i:i + 200]) for i in range(0, n_uncond, 200)])
        probabilities = classifier.predict_proba(samples.flatten(1).double().numpy())
        spread = np.bincount(probabilities.argmax(1), minlength=K) / n_uncond
        lines.append(f"| {sampler} {steps} | {n_uncond} | {(probabilities.max(1) > 0.9).mean():.1%} | "
                     + " | ".join(f"{s:.0%}" for s in spread) + " |")
        print(lines[-1], flush=True)
    lines.append(f"| held-out real digits | {len(test_images)} | {real_confident:.1%} | " + " | ".join(
        f"{s:.0%}" for s in np.bincount(test_labels.numpy(), minlength=K) / len(test_labels)) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        pathlib.Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
