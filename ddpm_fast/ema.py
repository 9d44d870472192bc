"""Exponential moving average of a model's weights, the weights that sampling uses."""

import torch

from .validation import check_int, check_number, describe


class EMA:
    """Shadow copies of a model's floating parameters and buffers.

    ``update(model, step)`` sets ``shadow = d * shadow + (1 - d) * weights`` with
    ``d = min(decay, (1 + step) / (10 + step))``: the warm-up keeps the average from being
    dominated by the random initial weights during the first few hundred steps.
    """

    def __init__(self, model, decay=0.9999):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {describe(model)}")
        self.decay = check_number("decay", decay, minimum=0.0, maximum=1.0, open_max=True)
        self.shadow = {name: value.detach().clone().float() if value.is_floating_point() else value.detach().clone()
                       for name, value in model.state_dict().items()}

    def decay_at(self, step):
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model, step):
        check_int("step", step, minimum=0)
        d = self.decay_at(step)
        for name, value in model.state_dict().items():
            shadow = self.shadow[name]
            if shadow.is_floating_point():
                shadow.lerp_(value.detach().float(), 1.0 - d)
            else:
                shadow.copy_(value)

    def state_dict(self):
        return dict(self.shadow)

    def load_state_dict(self, state):
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
        for name, value in state.items():
            if value.shape != self.shadow[name].shape:
                raise ValueError(f"EMA entry {name!r} has shape {tuple(value.shape)}, "
                                 f"the model has {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(value)

    @torch.no_grad()
    def copy_to(self, model):
        """Loads the averaged weights into ``model`` (same architecture)."""
        model.load_state_dict({name: value.to(model.state_dict()[name].dtype) for name, value in self.shadow.items()})
