"""Variational dequantisation: a learned noise q_phi(u | k) on [0, 1)^D for 8-bit data k (Ho et al. 2019, Flow++).

Uniform dequantisation models y = (k + u) / L with u ~ U[0, 1)^D, and -E_u log p(y) bounds the discrete
data's -log P(k) (MATH.md section 5). Any density q(u | k) on [0, 1)^D gives a bound as well,

    -log P(k) <= E_{u ~ q} [ -log p(y(k, u)) + log q(u | k) ],

which the uniform q (log q = 0) only reaches when p is flat inside every bin. A q that follows p inside
the bin tightens it. ScoreFlow trains q against its score model's likelihood bound L (nats on x):

    maximise  E_k E_{u ~ q} [ -L(x(k, u)) - log q(u | k) ],    x = scale (k + u) / L + shift.

The flow. Base eps ~ Logistic(0, 1)^D, then `couplings` affine coupling layers conditioned on k,
then u = sigmoid(v):

    v <- v_a,  v_b exp(s) + t   with (s, t) = net_i(v_a, k)  (a checkerboard half a; halves alternate)
    log q(u | k) = sum log Logistic(eps) - sum_i sum_b s_i - sum log sigmoid'(v)

and log sigmoid'(v) = log Logistic(v), since sigmoid is the logistic distribution's CDF. The last layer
of every net starts at zero, so an untrained dequantiser IS the uniform one (sigmoid of a logistic
variable is U(0, 1)) with log q = 0 exactly: training starts from the uniform bound and can only move
away from it where that pays. s is bounded by S tanh(s / S) (S = 3), which keeps exp(s) finite.

Range. sigmoid rounds to 1 in float32 for v > 17; u is clamped to at most 1 - 2^-b with b the bits of the
float's significand left after log2(L) (as `Dataset.dequantise` does), so k + u < k + 1 exactly and
floor recovers k. The log-density is that of the unclamped u; the clamp moves u by less than 2^-b
(x by less than scale 2^-b / L, about 1e-7 in float32), far below what the score model resolves.

Two-stage or joint. The default (`fit`, `sdelang dequantize RUN_DIR`) is two-stage: the score model is
trained with uniform noise, then q is fitted to it with the score model fixed, so the run's model stays
the one its checkpoint holds and both rows of `sdelang nll` (uniform, variational) score the same
network. `fit(joint=True)` (`sdelang dequantize --joint`) trains the score network as well, on the same
objective and q's samples, and the dequantiser file then carries those score weights, which `nll`
uses for the variational row. Either way the reported number is a bound under the q actually used.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.functional import softplus

from ..files import atomic_open
from .likelihood import bound

FILE = "dequantizer.pt"
SCALE_BOUND = 3.0


@dataclass(frozen=True)
class DequantizerConfig:
    shape: tuple            # one datapoint, [C, H, W]
    width: int = 32         # hidden channels of each coupling's net
    couplings: int = 4
    levels: int = 256


def logistic_logpdf(v: Tensor) -> Tensor:
    """log of the standard logistic density, -softplus(v) - softplus(-v), elementwise."""
    return -softplus(v) - softplus(-v)


def _checkerboard(shape: tuple, parity: int) -> Tensor:
    """1 where (c + h + w) % 2 == parity, else 0, [1, C, H, W]."""
    grids = torch.meshgrid(*(torch.arange(n) for n in shape), indexing="ij")
    return ((sum(grids) % 2) == parity).float().unsqueeze(0)


class Coupling(nn.Module):
    """One affine coupling: the half where `mask` is 0 is scaled and shifted by a conv net of the other half
    and of k (as its model-space value)."""

    def __init__(self, channels: int, width: int, mask: Tensor):
        super().__init__()
        self.register_buffer("mask", mask)
        self.net = nn.Sequential(nn.Conv2d(2 * channels, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, 2 * channels, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, v: Tensor, condition: Tensor) -> tuple[Tensor, Tensor]:
        mask = self.mask.to(v.dtype)
        raw, shift = self.net(torch.cat([v * mask, condition], 1)).chunk(2, 1)
        s = SCALE_BOUND * torch.tanh(raw / SCALE_BOUND) * (1 - mask)
        return v * mask + (1 - mask) * (v * s.exp() + shift), s.flatten(1).sum(1)


class Dequantizer(nn.Module):
    """q_phi(u | k) for 8-bit images k [B, C, H, W] (module docstring)."""

    def __init__(self, config: DequantizerConfig):
        super().__init__()
        shape = tuple(config.shape)
        if len(shape) != 3:
            raise ValueError(f"variational dequantisation needs image data [C, H, W], got samples of shape {shape}")
        if config.couplings < 1 or config.width < 1:
            raise ValueError(f"couplings and width must be >= 1, got {config.couplings} and {config.width}")
        self.config = DequantizerConfig(shape, config.width, config.couplings, config.levels)
        self.layers = nn.ModuleList(Coupling(shape[0], config.width, _checkerboard(shape, i % 2))
                                    for i in range(config.couplings))

    def _condition(self, k: Tensor) -> Tensor:
        return (k + 0.5) * (2.0 / self.config.levels) - 1.0

    def transform(self, eps: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """u = sigmoid(flow(eps; k)) and log q(u | k), [B] in nats, for a base draw eps (any real values)."""
        condition = self._condition(k)
        v, log_det = eps, eps.new_zeros(eps.shape[0])
        for layer in self.layers:
            v, s = layer(v, condition)
            log_det = log_det + s
        log_q = (logistic_logpdf(eps) - logistic_logpdf(v)).flatten(1).sum(1) - log_det
        bits = 1 - round(math.log2(torch.finfo(v.dtype).eps)) - math.ceil(math.log2(self.config.levels))
        return torch.sigmoid(v).clamp(max=1 - 2.0**-bits), log_q

    def sample(self, k: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """u ~ q(. | k) in [0, 1) and log q(u | k): eps = logit(w), w ~ U(0, 1), a logistic draw."""
        w = torch.rand(k.shape, generator=generator, device=k.device, dtype=k.dtype)
        tiny = torch.finfo(k.dtype).tiny
        eps = torch.log(w.clamp(min=tiny)) - torch.log1p(-w)
        return self.transform(eps, k)


def save(dequantizer: Dequantizer, out: Path, step: int, score: dict | None = None) -> None:
    """RUN_DIR/dequantizer.pt, atomically: q's configuration and weights, and with `score` (a jointly
    trained score model's state dict) the score weights that belong with this q."""
    state = dict(config=dict(asdict(dequantizer.config), shape=list(dequantizer.config.shape)),
                 state=dequantizer.state_dict(), step=step)
    if score is not None:
        state["score"] = score
    with atomic_open(Path(out) / FILE) as file:
        torch.save(state, file)


def _read(out: Path) -> dict | None:
    path = Path(out) / FILE
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def load(out: Path, device="cpu") -> Dequantizer | None:
    """The run's dequantiser (run directory `out`), or None when it has none; weights only, no pickled code."""
    state = _read(out)
    if state is None:
        return None
    config = DequantizerConfig(**dict(state["config"], shape=tuple(state["config"]["shape"])))
    dequantizer = Dequantizer(config)
    dequantizer.load_state_dict(state["state"])
    return dequantizer.to(device).eval().requires_grad_(False)


def load_score(out: Path) -> dict | None:
    """The score weights trained jointly with the run's dequantiser (`fit(joint=True)`), or None."""
    state = _read(out)
    return None if state is None else state.get("score")


def objective(sde, model, dequantizer: Dequantizer, dataset, k: Tensor, *, generator=None,
              samples: int = 1) -> Tensor:
    """Per datapoint, L(x(k, u)) + log q(u | k) with u ~ q (reparameterised, so gradients reach phi), [B] nats:
    the variational bound on -log P(k) up to the constant -D log(scale) + D log(L) of the map to x."""
    u, log_q = dequantizer.sample(k, generator)
    x = dataset.to_model(k, u)
    return bound(sde, model, x, samples=samples, generator=generator).value + log_q


def fit(model, dequantizer: Dequantizer, dataset, *, steps: int, batch: int = 64, lr: float = 1e-3,
        seed: int = 0, samples: int = 1, joint: bool = False, score_lr: float = 1e-4, on_log=None,
        log_every: int = 25) -> list[tuple[int, float]]:
    """Minimise E[L(x) + log q] over training batches (Adam, `steps` steps, one bound sample per datapoint
    and step unless `samples`). Returns (step, mean objective in nats) per logging interval.

    joint=False: q alone, the score model fixed (ScoreFlow's last stage). joint=True: the score network too,
    at `score_lr`, on the same objective: its only term that depends on the network is the bound's score
    term, the likelihood-weighted denoising loss with t uniform in logSNR, now on q's samples. The model is
    changed in place (left in eval mode, gradients off)."""
    sde = model.sde
    anchor = sde._anchor
    model.requires_grad_(False).eval()
    dequantizer.to(anchor.device, anchor.dtype).train().requires_grad_(True)
    groups = [dict(params=list(dequantizer.parameters()), lr=lr)]
    if joint:
        model.net.requires_grad_(True).train()
        groups.append(dict(params=list(model.net.parameters()), lr=score_lr))
    optimizer = torch.optim.Adam(groups)
    trained = [p for group in groups for p in group["params"]]
    rows = torch.Generator("cpu").manual_seed(seed)
    noise = torch.Generator(anchor.device).manual_seed(seed + 1)
    history = []
    running = torch.zeros((), device=anchor.device, dtype=torch.float64)
    for step in range(1, steps + 1):
        index = torch.randint(len(dataset), (batch,), generator=rows)
        k = dataset.x[index].to(anchor.device, anchor.dtype)
        loss = objective(sde, model, dequantizer, dataset, k, generator=noise, samples=samples).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        running += loss.detach()
        if step % log_every == 0 or step == steps:
            since = step - (history[-1][0] if history else 0)
            history.append((step, float(running) / since))     # one sync per logging interval
            running.zero_()
            if on_log is not None:
                on_log(*history[-1])
    model.requires_grad_(False).eval()
    return history
