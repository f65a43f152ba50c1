"""The image network: a U-Net in the style of DDPM++ / NCSN++ (Song et al. 2021, after Ho et al. 2020).

    input conv 3x3 -> per level l = 0..depth-1 (resolution R / 2^l, channels width * (1, 2, 2, ...)):
        `blocks` residual blocks (self-attention after each where the resolution is `attention`),
        then a stride-2 conv down (not after the last level)
    middle: residual block, self-attention, residual block
    per level, coarsest first: `blocks` + 1 residual blocks, each fed the matching down-path activation
        (concatenated), attention as above, then nearest-neighbour upsampling and a 3x3 conv
    output: GroupNorm, SiLU, conv 3x3

Residual block: GroupNorm, SiLU, conv 3x3, + a projection of the time features, GroupNorm, SiLU,
dropout, conv 3x3, added to the (1x1-projected) input. Skip rescaling: every residual sum is divided by
sqrt(2), so that a block's output keeps its input's scale however deep the network (DDPM++'s
skip_rescale). The second conv of each block, the attention output and the final conv start at zero,
so the untrained network predicts eps = 0 and each block starts as the identity.

Options (ModelConfig): `bf16` runs the network under torch.autocast in bfloat16 (the output is cast back
to the input's dtype; the SDE, the input scaling and the loss stay in full precision); `channels_last`
keeps the activations in NHWC, the layout convolutions are fastest in on GPUs; `compile` wraps the
forward pass in torch.compile on first use (never saved: checkpoints are the same with or without it).
"""
from __future__ import annotations

import math

import torch
from torch import nn

SQRT_HALF = 1 / math.sqrt(2)


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with min(32, C / 4) groups (DDPM++), reduced to a divisor of C."""
    return nn.GroupNorm(math.gcd(channels, min(32, max(1, channels // 4))), channels)


def _zero(layer: nn.Module) -> nn.Module:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class TimeEmbedding(nn.Module):
    """Sinusoidal features of 1000 tau (periods up to 10^4, as in the transformer), then a two-layer MLP."""

    def __init__(self, size: int):
        super().__init__()
        if size < 4 or size % 2:
            raise ValueError(f"embedding size must be an even number >= 4, got {size}")
        half = size // 2
        self.register_buffer("frequencies", torch.exp(-math.log(10_000.0) * torch.arange(half) / half),
                             persistent=False)
        self.mlp = nn.Sequential(nn.Linear(size, 4 * size), nn.SiLU(), nn.Linear(4 * size, 4 * size))

    def forward(self, tau: torch.Tensor) -> torch.Tensor:
        angles = 1000.0 * tau[:, None] * self.frequencies.to(tau.dtype)
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=1))


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, embedding: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(embedding, cout)
        self.norm2, self.drop = _norm(cout), nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(nn.functional.silu(self.norm1(x))) + self.time(emb)[:, :, None, None]
        h = self.conv2(self.drop(nn.functional.silu(self.norm2(h))))
        return (self.skip(x) + h) * SQRT_HALF


class Attention(nn.Module):
    """Single-head self-attention over the H W positions, with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x, emb=None):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3).unbind(1)   # [B, HW, C] each
        attended = nn.functional.scaled_dot_product_attention(q, k, v)
        return (x + self.out(attended.transpose(1, 2).reshape(b, c, h, w))) * SQRT_HALF


class UNet(nn.Module):
    """eps_theta for images [B, C, H, W] (module docstring); H and W divisible by 2^(depth - 1)."""

    def __init__(self, channels: int, height: int, config):
        super().__init__()
        depth, blocks, drop = config.depth, config.blocks, config.dropout
        widths = [config.width * min(2, 1 + level) for level in range(depth)]
        emb = 4 * config.embedding
        self.bf16, self.channels_last, self.compile = config.bf16, config.channels_last, config.compile
        self.attention = config.attention
        self.time = TimeEmbedding(config.embedding)
        self.inp = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        skips, previous = [widths[0]], widths[0]
        for level, width in enumerate(widths):
            for _ in range(blocks):
                self.down.append(ResidualBlock(previous, width, emb, drop))
                previous = width
                skips.append(width)
            if level < depth - 1:
                self.down.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
                skips.append(width)
        self.middle = nn.ModuleList([ResidualBlock(previous, previous, emb, drop), Attention(previous),
                                     ResidualBlock(previous, previous, emb, drop)])
        self.up = nn.ModuleList()
        for level in reversed(range(depth)):
            for _ in range(blocks + 1):
                self.up.append(ResidualBlock(previous + skips.pop(), widths[level], emb, drop))
                previous = widths[level]
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(previous, previous, 3, padding=1)))
        self.attend = nn.ModuleDict({str(id_): Attention(block.conv1.out_channels)
                                     for id_, block in self._blocks_at_attention(height)})
        self.out = nn.Sequential(_norm(widths[0]), nn.SiLU(), _zero(nn.Conv2d(widths[0], channels, 3, padding=1)))
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def _blocks_at_attention(self, height: int):
        """(index in down + up, block) of the residual blocks that run at resolution (height) `attention`;
        the first level runs at the data's height."""
        found, resolution = [], height
        for index, layer in enumerate(self.down):
            if isinstance(layer, ResidualBlock) and resolution == self.attention:
                found.append((index, layer))
            elif not isinstance(layer, ResidualBlock):
                resolution //= 2
        for index, layer in enumerate(self.up, start=len(self.down)):
            if isinstance(layer, ResidualBlock) and resolution == self.attention:
                found.append((index, layer))
            elif not isinstance(layer, ResidualBlock):
                resolution *= 2
        return found

    def _maybe_attend(self, index, h):
        layer = self.attend[str(index)] if str(index) in self.attend else None
        return h if layer is None else layer(h)

    def _forward(self, x, tau):
        emb = self.time(tau)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.inp(x)
        skips = [h]
        for index, layer in enumerate(self.down):
            h = self._maybe_attend(index, layer(h, emb)) if isinstance(layer, ResidualBlock) else layer(h)
            skips.append(h)
        for layer in self.middle:
            h = layer(h, emb)
        for index, layer in enumerate(self.up, start=len(self.down)):
            if isinstance(layer, ResidualBlock):
                h = self._maybe_attend(index, layer(torch.cat([h, skips.pop()], dim=1), emb))
            else:
                h = layer(h)
        return self.out(h)

    def forward(self, x, tau):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            if self.compile:
                if self.__dict__.get("_compiled") is None:
                    self.__dict__["_compiled"] = torch.compile(self._forward)
                out = self.__dict__["_compiled"](x, tau)
            else:
                out = self._forward(x, tau)
        return out.to(x.dtype).contiguous()

    def __getstate__(self):
        # copy.deepcopy (the EMA copy) and pickling must not carry a compiled function bound to this instance
        state = dict(self.__dict__)
        state.pop("_compiled", None)
        return state
