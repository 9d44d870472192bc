"""Class labels for class-conditional models: label dropout (classifier-free guidance training)
and a model bound to fixed labels.

A class-conditional :class:`ddpm_fast.nn.UNet` has ``num_classes`` classes, labels 0 .. K - 1,
and one more label, ``null_class`` = K: the unconditional model. Training with label dropout
(Ho & Salimans 2022, "Classifier-Free Diffusion Guidance") replaces each label by the null one
with probability ``cond_drop_prob``, so one network learns both the conditional and the
unconditional prediction that guided sampling combines.
"""

import torch
from torch import nn

from .validation import check_class_labels, check_number, describe


def model_classes(model):
    """(num_classes, null_class) of a model (through DistributedDataParallel's ``module``), or
    (None, None) for a model without classes."""
    inner = getattr(model, "module", model)
    num_classes = getattr(inner, "num_classes", None)
    return (None, None) if num_classes is None else (num_classes, getattr(inner, "null_class", num_classes))


def drop_labels(y, null_class, p, generator=None):
    """y with each label independently replaced by ``null_class`` with probability p.

    One uniform draw per label from ``generator`` (torch's default generator when None, so a
    training run seeded per step reproduces it); p = 0 returns y itself and draws nothing.
    """
    p = check_number("cond_drop_prob", p, 0.0, 1.0)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a tensor of class labels, got {describe(y)}")
    if p == 0.0:
        return y
    drop = torch.rand(y.shape, device=y.device, generator=generator) < p
    return torch.where(drop, torch.full_like(y, null_class), y)


def training_labels(model, y, batch_size, device, cond_drop_prob, generator=None):
    """The labels p_losses passes to the model: y checked against the model's classes, with label dropout.

    None when y is None (an unconditional model, or a conditional one trained on the null label).
    """
    cond_drop_prob = check_number("cond_drop_prob", cond_drop_prob, 0.0, 1.0)
    num_classes, null_class = model_classes(model)
    if y is None:
        if cond_drop_prob:
            raise ValueError("cond_drop_prob needs class labels: pass y=labels (a [batch] tensor of class indices)")
        return None
    if num_classes is None:
        raise ValueError(f"y was given ({describe(y)}) but the model has no classes (no num_classes / "
                         f"null_class attributes; build it as UNet(..., num_classes=K)), or pass y=None")
    y = check_class_labels(y, batch_size, num_classes, device)
    return drop_labels(y, null_class, cond_drop_prob, generator)


class WithLabels(nn.Module):
    """``model`` with its class labels fixed: ``WithLabels(model, y)(x, t) == model(x, t, y=y)``.

    For the sampling loops, which call ``model(x, t)``; exposes the model's parameters (so a loop
    finds its device) and ``config``. ``y`` has one label per sample of the batch sampled.
    """

    def __init__(self, model, y):
        super().__init__()
        self.model, self.y = model, y

    @property
    def config(self):
        return self.model.config

    def forward(self, x, t):
        return self.model(x, t, y=self.y)
