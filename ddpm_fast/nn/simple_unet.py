"""The seed's SimpleUNet (a minimal demonstration backbone), kept as written for scripts that use it.

Only its missing ``import math`` is added. Note what the seed's design implies: the timestep
embedding is computed but not added to the features, so the output does not depend on ``t``;
and ``GroupNorm(32, ...)`` needs ``model_channels`` divisible by 32. For real training use
:class:`ddpm_fast.nn.UNet`.
"""

import math
from typing import Tuple

import torch
import torch.nn as nn


class SimpleUNet(nn.Module):
    """
    A simplified UNet for noise prediction (demonstration only).
    Real work needs a fuller architecture (ResNet blocks, attention, ...).
    """

    def __init__(
        self,
        in_channels: int = 3,
        model_channels: int = 128,
        num_res_blocks: int = 2,
        attention_resolutions: Tuple[int, ...] = (16,),
        dropout: float = 0.0
    ):
        super().__init__()
        self.in_channels = in_channels
        self.model_channels = model_channels

        # time embedding layers
        self.time_embed = nn.Sequential(
            nn.Linear(128, model_channels),
            nn.SiLU(),
            nn.Linear(model_channels, model_channels)
        )

        # input convolution
        self.input_blocks = nn.ModuleList([
            nn.Conv2d(in_channels, model_channels, kernel_size=3, padding=1)
        ])

        # residual block (simplified; no attention)
        self.middle_block = self._make_res_block(model_channels, dropout)

        # output layer
        self.output_blocks = nn.ModuleList([
            nn.Conv2d(model_channels, in_channels, kernel_size=3, padding=1)
        ])

    def _make_res_block(
        self,
        channels: int,
        dropout: float
    ) -> nn.Module:
        return nn.Sequential(
            nn.GroupNorm(32, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.GroupNorm(32, channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        )

    def timestep_embedding(self, timesteps: torch.Tensor, dim: int = 128) -> torch.Tensor:
        """
        Sinusoidal position encoding of the timesteps.
        """
        half = dim // 2
        freqs = torch.exp(
            -math.log(10000) * torch.arange(half, dtype=torch.float32) / half
        ).to(device=timesteps.device)
        args = timesteps[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """
        Forward pass: takes x_t and the timesteps t, returns the predicted noise.
        """
        # time embedding
        emb = self.timestep_embedding(timesteps)
        emb = self.time_embed(emb)

        # input
        h = self.input_blocks[0](x)

        # middle (simplified)
        h = self.middle_block(h)

        # output
        return self.output_blocks[0](h)
