"""Score models for any compiled SDE: a noise-prediction network behind s(x, t) = -eps_theta(x, t) / sigma(t).

The network never sees an SDE-specific quantity except through two generic maps computed from the
kernel N(m x0 + c, v I), so the same code serves VE, VP, subVP and any new SDE:

    input    x_in = (x - c(t)) / sqrt(m(t)^2 s_data^2 + v(t))    (unit scale at every t)
    time     tau  = (t - eps) / (T - eps) in [0, 1], sinusoidal features
    output   eps_theta, the noise z in x_t = m x0 + c + sigma z;  score = -eps_theta / sigma

Two networks: `MLP` for vectors and a small `UNet` for images (8x8, 28x28), sized by `ModelConfig`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig


class TimeFeatures(nn.Module):
    """sin/cos of tau at geometrically spaced frequencies 1..1000, then a two-layer MLP."""

    def __init__(self, size: int):
        super().__init__()
        if size < 4 or size % 2:
            raise ValueError(f"embedding size must be an even number >= 4, got {size}")
        half = size // 2
        self.register_buffer("frequencies", torch.exp(torch.linspace(0.0, math.log(1000.0), half)),
                             persistent=False)
        self.mlp = nn.Sequential(nn.Linear(size, size), nn.SiLU(), nn.Linear(size, size))

    def forward(self, tau: torch.Tensor) -> torch.Tensor:
        angles = tau[:, None] * self.frequencies.to(tau.dtype)
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=1))


class ResidualLinear(nn.Module):
    def __init__(self, width: int, embedding: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.inner = nn.Linear(width, width)
        self.time = nn.Linear(embedding, width)
        self.outer = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), nn.Linear(width, width))

    def forward(self, h, emb):
        return h + self.outer(self.inner(nn.functional.silu(self.norm(h))) + self.time(emb))


class MLP(nn.Module):
    """eps_theta for vectors [B, d]: residual blocks, the time features added inside each block."""

    def __init__(self, dim: int, config: ModelConfig):
        super().__init__()
        self.time = TimeFeatures(config.embedding)
        self.inp = nn.Linear(dim, config.width)
        self.blocks = nn.ModuleList(ResidualLinear(config.width, config.embedding, config.dropout)
                                    for _ in range(config.depth))
        self.out = nn.Sequential(nn.LayerNorm(config.width), nn.SiLU(), nn.Linear(config.width, dim))

    def forward(self, x, tau):
        emb = self.time(tau)
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h).view_as(x)


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class ResidualConv(nn.Module):
    def __init__(self, cin: int, cout: int, embedding: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(embedding, cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(nn.functional.silu(self.norm1(x))) + self.time(emb)[:, :, None, None]
        h = self.conv2(self.drop(nn.functional.silu(self.norm2(h))))
        return self.skip(x) + h


class UNet(nn.Module):
    """eps_theta for images [B, C, H, W]: `depth` levels, channels width * (1, 2, 2, ...), one residual
    block per level on the way down and two on the way up, stride-2 convolutions down, nearest up.
    H and W must be divisible by 2^(depth - 1) (8x8 and 28x28 with depth <= 3)."""

    def __init__(self, channels: int, config: ModelConfig):
        super().__init__()
        widths = [config.width * min(2, 1 + level) for level in range(config.depth)]
        emb, drop = config.embedding, config.dropout
        self.factor = 2 ** (config.depth - 1)
        self.time = TimeFeatures(emb)
        self.inp = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.pool = nn.ModuleList()
        previous = widths[0]
        for level, width in enumerate(widths):
            self.down.append(ResidualConv(previous, width, emb, drop))
            last = level == len(widths) - 1
            self.pool.append(nn.Identity() if last else nn.Conv2d(width, width, 3, stride=2, padding=1))
            previous = width
        self.middle = ResidualConv(previous, previous, emb, drop)
        self.up = nn.ModuleList()
        self.unpool = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            self.up.append(ResidualConv(previous + width, width, emb, drop))
            first = level == 0
            self.unpool.append(nn.Identity() if first else nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, widths[level - 1], 3, padding=1)))
            previous = width if first else widths[level - 1]
        self.out = nn.Sequential(nn.GroupNorm(_groups(widths[0]), widths[0]), nn.SiLU(),
                                 nn.Conv2d(widths[0], channels, 3, padding=1))

    def forward(self, x, tau):
        emb = self.time(tau)
        h = self.inp(x)
        skips = []
        for block, pool in zip(self.down, self.pool):
            h = block(h, emb)
            skips.append(h)
            h = pool(h)
        h = self.middle(h, emb)
        for block, unpool in zip(self.up, self.unpool):
            h = unpool(block(torch.cat([h, skips.pop()], dim=1), emb))
        return self.out(h)


class ScoreModel(nn.Module):
    """s(x, t) = -eps_theta(x_in, tau) / sigma(t) for the compiled SDE `sde` (a submodule: it moves with
    `.to()`). `noise(x, t)` is eps_theta itself, what the denoising loss compares with z."""

    def __init__(self, sde: nn.Module, net: nn.Module, data_std: float):
        super().__init__()
        if not (math.isfinite(data_std) and data_std > 0):
            raise ValueError(f"data_std must be positive and finite, got {data_std!r}")
        self.sde = sde
        self.net = net
        self.data_std = float(data_std)

    def noise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._noise_and_std(x, t)[0]

    def _noise_and_std(self, x: torch.Tensor, t: torch.Tensor):
        """eps_theta(x, t) and sigma(t) (the score needs both; computed once)."""
        sde = self.sde
        m, c, std = sde.mean_coeff(t), sde.mean_offset(t), sde.std(t)
        scale = torch.rsqrt(m**2 * self.data_std**2 + std**2)
        x_in = (x - sde._expand(c, x)) * sde._expand(scale, x)
        tau = (t - sde.eps) / (sde.T - sde.eps)
        return self.net(x_in, tau), std

    def forward(self, x: torch.Tensor, t: torch.Tensor, noise: bool = False) -> torch.Tensor:
        """The score s(x, t), or eps_theta(x, t) with noise=True (one entry point, so that
        DistributedDataParallel sees every training call)."""
        eps, std = self._noise_and_std(x, t)
        return eps if noise else -eps / self.sde._expand(std, x)


def build_model(sde: nn.Module, shape: tuple[int, ...], config: ModelConfig) -> ScoreModel:
    """The score model `config` describes for data of one-sample shape `shape`."""
    kind = config.kind
    if kind == "auto":
        kind = "unet" if len(shape) == 3 else "mlp"
    if kind == "mlp":
        net = MLP(math.prod(shape), config)
    elif kind == "unet":
        if len(shape) != 3:
            raise ValueError(f"the U-Net needs image data [C, H, W], got samples of shape {tuple(shape)}")
        factor = 2 ** (config.depth - 1)
        if shape[1] % factor or shape[2] % factor:
            raise ValueError(f"a U-Net of depth {config.depth} needs H and W divisible by {factor}, got "
                             f"{shape[1]}x{shape[2]}; lower the depth")
        net = UNet(shape[0], config)
    else:
        raise ValueError(f"unknown model kind {config.kind!r}; use 'mlp', 'unet' or 'auto'")
    if config.width < 8 or config.depth < 1:
        raise ValueError(f"width must be >= 8 and depth >= 1, got width={config.width}, depth={config.depth}")
    return ScoreModel(sde, net, config.data_std)
