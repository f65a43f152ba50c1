"""Score models for any compiled SDE: a network behind s(x, t), with input scaling and output map per kind.

The network never sees an SDE-specific quantity except through generic maps of the module's kind
(`sde.kind`: "affine", "coupled" or "general"), so the same code serves every compiled SDE:

    affine   kernel N(m x0 + c, v I):
             input   x_in = (x - c(t)) / sqrt(m(t)^2 s_data^2 + v(t))        (unit scale at every t)
             output  eps_theta = sigma(t) x_in / sqrt(m^2 s_data^2 + v) + net(x_in, tau): the noise
                     prediction of the Gaussian score -(x - c) / (m^2 s_data^2 + v) plus a learned part
                     (ModelConfig.gaussian; runs made before it have the plain net);
                     score = -eps_theta / sigma
    coupled  state u = (u_1, ..., u_K) per data entry, kernel N(Phi u0, Sigma) (kinds.md). For data
             N(0, s_data^2), u_t ~ N(o(t), C(t)) with o = Phi u0_aux, C = Phi e_d e_d^T Phi^T s_data^2 + Sigma:
             input   u_k,in = (u_k - o_k(t)) / sqrt(C_kk(t))                 (unit scale per component)
             output  eps_theta = eps_G(u, t) + net(u_in, tau) for every component, eps_G the noise
                     prediction of that Gaussian's score -C^-1 (u - o); score = sde.noise_to_score(eps_theta, t),
                     -L_NN^-T eps_N at the noisy components and 0 elsewhere (hybrid score matching)
    general  no kernel: the mean mu(t) and standard deviation r(t) of x_t for data N(0, s_data^2) are
             estimated once from Euler-Maruyama paths of the forward SDE and tabulated on [0, T]
             (`simulated_moments`; a buffer, saved with the model):
             input   x_in = (x - mu(t)) / r(t)
             output  score = (net(x_in, tau) - x_in) / r(t): the score of N(mu, r^2) plus a learned part
             For affine SDEs mu and r are exactly c(t) and sqrt(m^2 s_data^2 + v): the same scaling,
             measured instead of derived. Without a kernel there is no noise to predict.
    time     tau = (t - eps) / (T - eps) in [0, 1], sinusoidal features (every kind)

Why a Gaussian part in the output (a "mixed score", as in Dockhorn et al. 2022): the network learns
only how the data differ from a Gaussian. For an affine SDE the plain network's score is too small in
the prior's tails, where it was never trained: the deterministic samplers then carried the largest
prior draws far out (8 of 1000 moons samples at |x| from 4.6 to 96 with ode, dpm2, heun); with the
Gaussian part, none, and a lower held-out NLL (1.349 +- 0.020 nats against 1.399) with fewer flow
evaluations (473 against 731). For CLD near t = 0 the velocity's score is
almost exactly the Gaussian one, -v / (gamma M), which a plain network would have to learn as an
identity map. For a general SDE whose restoring drift grows faster than linearly (cubic Langevin), the
reverse SDE stays stable only where |s| grows fast enough with |x|; a plain network's score flattens
away from the data and the samples diverge, while the Gaussian part keeps the score of the tails near
-(x - mu) / r^2. Measured in docs/runtime.md ("Coupled and general SDEs: training").

The network works on the state: a coupled SDE's K components are stacked along dim 1, so its input
has K times the data's channels (`state_shape`). Two networks: `MLP` for vectors and a DDPM++-style
`UNet` for images (unet.py), sized by `ModelConfig`; a size left out (None) is the data's default,
`model_size`.
"""
from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch
from torch import nn

from .config import SIMULATION_STEPS, ModelConfig
from .kinds import kind_of, state_shape
from .unet import UNet


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


def coupled_gaussian(sde, t: torch.Tensor, data_std: float):
    """For data N(0, s^2): the mean o(t) [B, K] and covariance C(t) = Phi e_d e_d^T Phi^T s^2 + Sigma(t)
    [B, K, K] of u_t per entry, and L_NN [B, N, N], the noisy components' block of Sigma's Cholesky
    factor with the components without noise first (the factor noise_to_score uses), float64."""
    Phi, Sigma = sde.kernel(t)
    column = Phi[:, :, sde.data_index:sde.data_index + 1]
    covariance = column @ column.transpose(1, 2) * data_std**2 + Sigma
    # u0 = data at the data component, initial means elsewhere; the module's own factor and order.
    return Phi @ (sde.mean0 * sde._aux()), covariance, sde._factor(t)[1]


def _normal(like: torch.Tensor, generator) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def initial_state(sde, x0: torch.Tensor, generator=None) -> torch.Tensor:
    """x(0) = x0 + sqrt(v0) z, z ~ N(0, I): the data plus the module's initial noise of variance v0."""
    return x0 + math.sqrt(float(sde.v0)) * _normal(x0, generator)


def euler_maruyama_step(sde, x: torch.Tensor, s: torch.Tensor, h: torch.Tensor, generator=None) -> torch.Tensor:
    """One Euler-Maruyama step of the forward SDE from time s over h (both [B]):
    x + f(x, s) h + g(x, s) sqrt(h) z, z ~ N(0, I). g may be [B] (affine) or x's shape (general)."""
    drift, g = sde.sde(x, s)
    return x + drift * sde._expand(h, x) + sde._expand(g, x) * sde._expand(h.sqrt(), x) * _normal(x, generator)


def simulate(sde, x0: torch.Tensor, t: torch.Tensor, *, steps: int = SIMULATION_STEPS, generator=None) -> torch.Tensor:
    """x_t for each sample's own time t_i ([B]): Euler-Maruyama from x(0) = x0 + sqrt(v0) z at time 0,
    `steps` steps of size h_i = t_i / steps, vectorised over the batch. No gradient flows through it."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    with torch.no_grad():
        x = initial_state(sde, x0, generator)
        h = t / steps
        for k in range(steps):
            x = euler_maruyama_step(sde, x, k * h, h, generator)
    return x


MOMENT_POINTS = 257      # tabulated times 0, T/256, ..., T of a general SDE's simulated moments
MOMENT_PATHS = 8192      # paths: the table's standard deviation has relative error ~ 1/sqrt(2 paths) = 0.8 %
MOMENT_SEED = 0


def simulated_moments(sde, data_std: float, *, points: int = MOMENT_POINTS, paths: int = MOMENT_PATHS,
                      seed: int = MOMENT_SEED) -> torch.Tensor:
    """Mean mu(t_j) and standard deviation r(t_j) of x_{t_j} for data N(0, s_data^2), t_j = j T / (points - 1),
    float64 [2, points]: Euler-Maruyama paths of one entry (the SDE acts entrywise) from
    x(0) = x0 + sqrt(v0) z (euler_maruyama_step), on the CPU in float64 with a fixed seed,
    so a model rebuilt anywhere gets the same table."""
    reference = copy.deepcopy(sde).to("cpu", torch.float64)
    for substeps in MOMENT_SUBSTEPS:
        table = _moment_table(reference, data_std, points, paths, seed, substeps)
        if torch.isfinite(table).all() and (table[1] > 0).all():
            return table
    raise ValueError(f"the forward SDE's Euler-Maruyama paths from data of std {data_std} diverge or collapse "
                     f"on [0, {sde.T}] even with {(points - 1) * MOMENT_SUBSTEPS[-1]} steps; the input scaling of a "
                     "general SDE needs finite, non-degenerate paths (check the drift's stability)")


# Euler steps between two points of the moment table, tried in turn: a stiff but stable drift (-50 x^3) blows up
# explicit Euler at 256 steps on [0, 5] and not at 2048. Each try is deterministic (the same seed), so a run
# rebuilt anywhere gets the same table.
MOMENT_SUBSTEPS = (1, 8, 64)


def _moment_table(reference, data_std: float, points: int, paths: int, seed: int, substeps: int) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(seed)
    x = initial_state(reference, data_std * torch.randn(paths, 1, generator=generator, dtype=torch.float64),
                      generator)
    h = torch.full((paths,), float(reference.T) / ((points - 1) * substeps), dtype=torch.float64)
    moments = [torch.stack([x.mean(), x.std()])]
    for j in range(points - 1):
        for k in range(substeps):
            x = euler_maruyama_step(reference, x, (j * substeps + k) * h, h, generator)
        moments.append(torch.stack([x.mean(), x.std()]))
        if not torch.isfinite(moments[-1]).all():   # diverged: the caller tries smaller steps
            break
    return torch.stack(moments, 1)


class ScoreModel(nn.Module):
    """The score s(x, t) of the compiled SDE `sde` (a submodule: it moves with `.to()`) from the network
    `net(x_in, tau)`, with the input scaling and output map of the module's kind (module docstring).

    For affine and coupled SDEs the network predicts noise: `model(x, t, noise=True)` is eps_theta, what
    the denoising loss compares with z. For general SDEs it predicts the score and noise=True is an error.
    """

    def __init__(self, sde: nn.Module, net: nn.Module, data_std: float, gaussian: bool = True):
        super().__init__()
        self.gaussian = bool(gaussian)
        if not (math.isfinite(data_std) and data_std > 0):
            raise ValueError(f"data_std must be positive and finite, got {data_std!r}")
        self.sde = sde
        self.net = net
        self.data_std = float(data_std)
        self.kind = kind_of(sde)
        if self.kind not in ("affine", "coupled", "general"):
            raise ValueError(f"unknown SDE kind {self.kind!r}; expected 'affine', 'coupled' or 'general'")
        if self.kind == "general":
            self.register_buffer("moments", simulated_moments(sde, self.data_std))

    def noise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self(x, t, noise=True)

    def _tau(self, t: torch.Tensor) -> torch.Tensor:
        return (t - self.sde.eps) / (self.sde.T - self.sde.eps)

    def _noise_and_std(self, x: torch.Tensor, t: torch.Tensor):
        """Affine: eps_theta(x, t) and sigma(t) (the score needs both; computed once)."""
        sde = self.sde
        m, c, std = sde.mean_coeff(t), sde.mean_offset(t), sde.std(t)
        scale = torch.rsqrt(m**2 * self.data_std**2 + std**2)
        x_in = (x - sde._expand(c, x)) * sde._expand(scale, x)
        eps = self.net(x_in, self._tau(t))
        if self.gaussian:   # the Gaussian score's noise: sigma (x - c) / (m^2 s^2 + v) = sigma scale x_in
            eps = eps + sde._expand(std * scale, x) * x_in
        return eps, std

    def _coupled_noise(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Coupled: eps_theta(u, t) = eps_G(u, t) + net(u_in, tau) for every component, u_k,in = (u_k - o_k) / std_k,
        eps_G the noise prediction of the Gaussian score -C^-1 (u - o) (data N(0, s^2)): -L_NN^T s_N at the
        noisy components, 0 elsewhere."""
        sde = self.sde
        offset, covariance, factor = coupled_gaussian(sde, t, self.data_std)
        std = covariance.diagonal(dim1=1, dim2=2).sqrt()
        centred = [part - sde._expand(offset[:, k].to(u.dtype), part) for k, part in enumerate(sde.split(u))]
        u_in = sde.join(part / sde._expand(std[:, k].to(u.dtype), part) for k, part in enumerate(centred))
        y = torch.stack([part.flatten(1) for part in centred], 1).to(torch.float64)      # [B, K, entries]
        score = -torch.linalg.solve_ex(covariance, y)[0]
        noisy = [k for k, is_noisy in enumerate(sde.noisy) if is_noisy]
        eps_noisy = -factor.transpose(1, 2) @ score[:, noisy]
        base = [torch.zeros_like(part) for part in centred]
        for row, k in enumerate(noisy):
            base[k] = eps_noisy[:, row].reshape(centred[k].shape).to(u.dtype)
        return sde.join(base) + self.net(u_in, self._tau(t))

    def _table(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """General: mu(t) and r(t), linear interpolation in t of the simulated table, [B] each."""
        points = self.moments.shape[1]
        position = (t / self.sde.T * (points - 1)).clamp(0, points - 1)
        low = position.floor().long().clamp(max=points - 2)
        frac = (position - low).to(self.moments.dtype)
        values = self.moments[:, low] * (1 - frac) + self.moments[:, low + 1] * frac
        return values[0].to(t.dtype), values[1].to(t.dtype)

    def _general_score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """General: s = (net(x_in, tau) - x_in) / r(t), x_in = (x - mu(t)) / r(t)."""
        mean, std = self._table(t)
        expand = self.sde._expand
        x_in = (x - expand(mean, x)) / expand(std, x)
        return (self.net(x_in, self._tau(t)) - x_in) / expand(std, x)

    def forward(self, x: torch.Tensor, t: torch.Tensor, noise: bool = False) -> torch.Tensor:
        """The score s(x, t), or eps_theta(x, t) with noise=True (one entry point, so that
        DistributedDataParallel sees every training call). x is the state: u for coupled SDEs."""
        if self.kind == "general":
            if noise:
                raise ValueError("a general SDE's model predicts the score directly (there is no Gaussian kernel, "
                                 "so no noise to predict); call model(x, t) without noise=True")
            return self._general_score(x, t)
        if self.kind == "coupled":
            eps = self._coupled_noise(x, t)
            return eps if noise else self.sde.noise_to_score(eps, t)
        eps, std = self._noise_and_std(x, t)
        return eps if noise else -eps / self.sde._expand(std, x)


# (width, depth) when ModelConfig leaves them out: the MLP of the 2-D toys, and U-Nets small enough that
# a README-sized CPU run takes minutes (docs/scoreflow.md measures them): 8x8 digits at two levels
# (8, 4) and width 32, 16x16 and up at three (e.g. 32, 16, 8 with attention at 16) and width 16.
MLP_SIZE = (128, 3)
SMALL_IMAGE_SIZE = (32, 2)      # height <= 8
IMAGE_SIZE = (16, 3)


def model_size(config: ModelConfig, shape: tuple[int, ...]) -> ModelConfig:
    """`config` with its kind, width and depth resolved for data samples of `shape`: "auto" is a U-Net for
    [C, H, W] data and an MLP otherwise; a width or depth of None takes the default above."""
    kind = config.kind
    if kind == "auto":
        kind = "unet" if len(shape) == 3 else "mlp"
    if kind == "mlp":
        width, depth = MLP_SIZE
    else:
        width, depth = SMALL_IMAGE_SIZE if len(shape) == 3 and shape[1] <= 8 else IMAGE_SIZE
    return replace(config, kind=kind, width=width if config.width is None else config.width,
                   depth=depth if config.depth is None else config.depth)


def build_model(sde: nn.Module, shape: tuple[int, ...], config: ModelConfig) -> ScoreModel:
    """The score model `config` describes for data of one-sample shape `shape`; the network is sized for
    the state, `state_shape(sde, shape)` (K times the data's channels for a coupled SDE)."""
    config = model_size(config, shape)
    if config.width < 8 or config.depth < 1:
        raise ValueError(f"width must be >= 8 and depth >= 1, got width={config.width}, depth={config.depth}")
    state = state_shape(sde, shape)
    if config.kind == "mlp":
        net = MLP(math.prod(state), config)
    elif config.kind == "unet":
        if len(shape) != 3:
            raise ValueError(f"the U-Net needs image data [C, H, W], got samples of shape {tuple(shape)}")
        factor = 2 ** (config.depth - 1)
        if shape[1] % factor or shape[2] % factor:
            raise ValueError(f"a U-Net of depth {config.depth} needs H and W divisible by {factor}, got "
                             f"{shape[1]}x{shape[2]}; lower the depth")
        if config.blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {config.blocks}")
        net = UNet(state[0], shape[1], config)
    else:
        raise ValueError(f"unknown model kind {config.kind!r}; use 'mlp', 'unet' or 'auto'")
    return ScoreModel(sde, net, config.data_std, gaussian=config.gaussian)
