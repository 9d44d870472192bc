"""Class-conditional training: label dropout and the labels p_losses gives the model."""

import math

import pytest
import torch
from torch import nn

from ddpm_fast import GaussianDiffusion
from ddpm_fast.conditioning import WithLabels, drop_labels, model_classes
from ddpm_fast.nn import UNet


class Recorder(nn.Module):
    """A class-conditional stand-in that records the labels it is called with."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.num_classes, self.null_class = num_classes, num_classes
        self.weight = nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, x, t, y=None):
        self.seen.append(y)
        return x * self.weight


def test_label_dropout_rate_is_p():
    n, p, null = 20000, 0.1, 10
    y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(0))
    dropped = drop_labels(y, null, p, generator=torch.Generator().manual_seed(1))
    is_null = dropped == null
    sigma = math.sqrt(n * p * (1 - p))  # binomial standard deviation: 42 labels
    assert abs(is_null.sum().item() - n * p) < 4 * sigma
    assert torch.equal(dropped[~is_null], y[~is_null])  # the others are kept as they were
    # Independent of the class: every class loses about p of its labels.
    for label in range(10):
        share = is_null[y == label].float().mean().item()
        assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / (y == label).sum().item())


def test_label_dropout_extremes_and_reproducibility():
    y = torch.arange(10).repeat(100)
    state = torch.get_rng_state()
    assert drop_labels(y, 10, 0.0) is y
    assert torch.equal(torch.get_rng_state(), state)  # p = 0 draws nothing: the training RNG is unchanged
    assert torch.equal(drop_labels(y, 10, 1.0), torch.full_like(y, 10))
    a = drop_labels(y, 10, 0.3, generator=torch.Generator().manual_seed(5))
    b = drop_labels(y, 10, 0.3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, y)
    torch.manual_seed(7)
    c = drop_labels(y, 10, 0.3)  # torch's default generator: a seeded training step reproduces it
    torch.manual_seed(7)
    assert torch.equal(drop_labels(y, 10, 0.3), c)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="cond_drop_prob must be a finite number in \\[0, 1\\]"):
            drop_labels(y, 10, bad)


def test_p_losses_gives_the_model_the_labels_with_dropout():
    diffusion = GaussianDiffusion(num_timesteps=50)
    model = Recorder()
    x, t = torch.randn(1000, 1, 2, 2), torch.randint(0, 50, (1000,))
    y = torch.randint(0, 10, (1000,))
    diffusion.p_losses(model, x, t, y=y)
    assert torch.equal(model.seen[-1], y)  # cond_drop_prob defaults to 0
    diffusion.p_losses(model, x, t, y=y, cond_drop_prob=0.5, generator=torch.Generator().manual_seed(0))
    expected = drop_labels(y, 10, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.seen[-1], expected) and 400 < (expected == 10).sum() < 600
    diffusion.p_losses(model, x, t, y=y, cond_drop_prob=1.0)
    assert (model.seen[-1] == 10).all()
    diffusion.p_losses(model, x, t)
    assert model.seen[-1] is None  # no labels: the model's own default (the null class for a UNet)


def test_p_losses_with_labels_is_the_loss_of_the_conditioned_model():
    torch.manual_seed(0)
    model = UNet.from_preset("digits", num_classes=10)
    with torch.no_grad():  # no zero-initialised layers: the output depends on y
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) / (p[0].numel() ** 0.5 if p.dim() > 1 else 10))
    diffusion = GaussianDiffusion(num_timesteps=50)
    x, t, noise = torch.randn(8, 1, 8, 8), torch.randint(0, 50, (8,)), torch.randn(8, 1, 8, 8)
    y = torch.arange(8)
    loss = diffusion.p_losses(model, x, t, noise, y=y)
    torch.testing.assert_close(loss, diffusion.p_losses(WithLabels(model, y), x, t, noise))
    assert not torch.allclose(loss, diffusion.p_losses(model, x, t, noise))


def test_p_losses_bad_labels_name_y():
    diffusion = GaussianDiffusion(num_timesteps=50)
    x, t = torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="y was given .* but the model has no classes"):
        diffusion.p_losses(UNet.from_preset("digits"), x, t, y=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="y was given"):
        diffusion.p_losses(lambda x, t: x, x, t, y=torch.zeros(4, dtype=torch.long))
    model = Recorder(num_classes=3)
    with pytest.raises(ValueError, match=r"y must be an integer tensor .*in \[0, 3\].*got values from 0 to 7"):
        diffusion.p_losses(model, x, t, y=torch.tensor([0, 1, 2, 7]))
    with pytest.raises(ValueError, match=r"y must be .*shape \[batch\] = \[4\]"):
        diffusion.p_losses(model, x, t, y=torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="y must be an integer tensor .*float32"):
        diffusion.p_losses(model, x, t, y=torch.zeros(4))
    with pytest.raises(ValueError, match="cond_drop_prob needs class labels"):
        diffusion.p_losses(model, x, t, cond_drop_prob=0.1)
    with pytest.raises(ValueError, match="cond_drop_prob must be"):
        diffusion.p_losses(model, x, t, y=torch.zeros(4, dtype=torch.long), cond_drop_prob=2.0)


def test_model_classes_looks_through_distributed_wrappers():
    model = UNet.from_preset("digits", num_classes=4)
    wrapper = nn.Module()
    wrapper.module = model
    assert model_classes(model) == model_classes(wrapper) == (4, 4)
    assert model_classes(UNet.from_preset("digits")) == (None, None)
