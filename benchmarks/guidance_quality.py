"""Classifier-free guidance on the shipped class-conditional digits model: class accuracy and diversity per scale.

    python benchmarks/guidance_quality.py [--n 100] [--scales 0,1,2,3,5] [--out FILE.md]

For each guidance scale s it draws N samples of every class (y = the class, DPM-Solver++ 2M at
20 steps, clip on, the same starting noise for every s) and reports:
- accuracy: the share that a logistic-regression digit classifier, trained on the real training
  digits (not part of the sampling path), assigns to the requested class;
- digits FID: all samples against the training digits on the digits feature network
  (``ddpm-fast eval``'s metric, docs/metrics.md), and recall (k = 3): how much of the data's
  variety the samples cover;
- within-class spread: the mean per-pixel standard deviation among the samples of one class
  (the real digits' value on the last row), a direct measure of diversity.
"""

import argparse
import pathlib

import torch
from sklearn.linear_model import LogisticRegression

from ddpm_fast import checkpoint
from ddpm_fast.data import load_dataset
from ddpm_fast.metrics import compute_metrics, extract_features, feature_network, reference_statistics, to_uint8
from ddpm_fast.train import load_for_sampling


def within_class_spread(images, labels, num_classes):
    return torch.stack([images[labels == k].std(dim=0).mean() for k in range(num_classes)]).mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=checkpoint.shipped_path())
    parser.add_argument("--n", type=int, default=100, help="samples per class and scale")
    parser.add_argument("--scales", default="0,1,2,3,5")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args()
    model, diffusion, state = load_for_sampling(args.ckpt, torch.device("cpu"))
    images, labels, _ = load_dataset("digits", "train", labels=True)
    classifier = LogisticRegression(max_iter=2000).fit(images.flatten(1).numpy(), labels.numpy())
    net = feature_network("digits")
    reference = reference_statistics("digits", net)
    K = model.num_classes
    y = torch.arange(K).repeat_interleave(args.n)
    x_T = torch.randn(len(y), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    lines = [f"Guidance on {pathlib.Path(args.ckpt).name} (step {state.get('step')}): {args.n} samples per class "
             f"and scale, DPM-Solver++ 2M 20 steps, clip on, the same x_T for every scale.", "",
             "| guidance scale | class accuracy | digits FID | recall | within-class spread |",
             "|---:|---:|---:|---:|---:|"]
    for scale in [float(s) for s in args.scales.split(",")]:
        with torch.no_grad():
            samples = torch.cat([
                diffusion.dpm_solver_sample_loop(model, x_T[i:i + 200].shape, num_steps=20, x_T=x_T[i:i + 200],
                                                 clip_denoised=True, y=y[i:i + 200], guidance_scale=scale)
                for i in range(0, len(y), 200)]).clamp(-1, 1)
        accuracy = (classifier.predict(samples.flatten(1).double().numpy()) == y.numpy()).mean()
        metrics = compute_metrics(extract_features(net, to_uint8(samples)), reference)
        lines.append(f"| {scale:g} | {accuracy:.1%} | {metrics['fid']:.3f} | {metrics['recall']:.3f} | "
                     f"{within_class_spread(samples, y, K):.3f} |")
        print(lines[-1], flush=True)
    real_accuracy = (classifier.predict(images.flatten(1).numpy()) == labels.numpy()).mean()
    real_spread = within_class_spread(images, labels, K)
    lines.append(f"| real training digits | {real_accuracy:.1%} | - | - | {real_spread:.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        pathlib.Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
