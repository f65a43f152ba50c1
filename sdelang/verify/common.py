"""What every check shares: the result types, settings and tolerances, and how to read an SDE back off its
own methods (the coefficients of sde(), the kernel of marginal_prob()), for each kind of module."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ..runtime.kinds import kind_of

OK, FAIL, WARN, NA = "ok", "FAIL", "warn", "n/a"

DEFAULT_PATHS = 32768   # Monte Carlo paths per starting point: about 2 s of simulation on one CPU core
DEFAULT_STEPS = 1000    # Euler-Maruyama steps from the start to T
STANDARD_ERRORS = 5.0   # Monte Carlo tolerance k: a correct module fails one comparison with p ~ 6e-7
KL_WARNING = 0.01       # nats per dimension (per data entry for coupled SDEs)
KS_LEVEL = 1e-3         # the sampler check fails when the Kolmogorov-Smirnov p-value is below this
FLOAT32_BOUND = 1e-4    # float32 relative error (logSNR: absolute) allowed: 3 of float32's 7 digits lost
IDENTITY_BOUND = 1e-9   # two float64 formulas of one quantity, relative (logSNR: absolute)
NORMAL = 1e-300         # above float64's smallest normal number (2.2e-308): a value below has lost digits
START_POINTS = (-2.0, 0.0, 3.0)  # x0 of the forward simulation (3.0 off-centre: a sign error shows)


class CheckResult(NamedTuple):
    """One row of the report. status: ok, FAIL, warn (does not fail) or n/a; measured and tolerance
    are None where a number would mean nothing (n/a)."""

    name: str
    status: str
    measured: float | None = None
    tolerance: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Settings:
    paths: int = DEFAULT_PATHS
    steps: int = DEFAULT_STEPS
    seed: int = 0
    data_std: float = 1.0

    def generator(self, device, salt: int) -> torch.Generator:
        """An independent stream per use, so that one check's draws do not depend on another's."""
        return torch.Generator(device).manual_seed(self.seed * 1000 + salt)


@dataclass(frozen=True)
class Comparison:
    """|error| against a tolerance, with what was compared."""

    error: float
    tolerance: float
    where: str

    @property
    def ratio(self) -> float:
        if math.isnan(self.error) or math.isnan(self.tolerance):  # a NaN anywhere is a failure
            return math.inf
        return self.error / self.tolerance if self.tolerance > 0 else (0.0 if self.error == 0 else math.inf)


def worst_row(name: str, comparisons: list[Comparison], note: str) -> CheckResult:
    """The row for several comparisons: the one nearest its tolerance (or furthest past it) is shown."""
    worst = max(comparisons, key=lambda c: c.ratio)
    status = OK if worst.ratio <= 1 else FAIL
    return CheckResult(name, status, worst.error, worst.tolerance, f"{note}; worst {worst.where}")


def not_applicable(names, reason: str) -> list[CheckResult]:
    return [CheckResult(name, NA, note=reason) for name in names]


def times(sde) -> tuple[float, float]:
    return float(sde.eps), float(sde.T)


def column(values, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device)


def flat(v, n: int, like: torch.Tensor) -> torch.Tensor:
    """A method's per-sample result as a vector of length n (methods may return [n], [n, 1] or a number)."""
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v.expand(n) if v.dim() == 0 else v.reshape(n)


def check_grid(sde, points: int = 64) -> torch.Tensor:
    """Times in [eps, T]: log-spaced (crowding near eps) and evenly spaced, eps and T included."""
    eps, T = times(sde)
    t = np.unique(np.concatenate([np.geomspace(eps, T, points), np.linspace(eps, T, points)]))
    return column(t, sde._anchor)


def comparison_times(sde, start: float) -> list[float]:
    """Where a simulation is compared with the kernel: eps, two log-spaced times (the small-noise
    regime), T/4, T/2, 3T/4 and T; only times in [eps, T] after the start."""
    eps, T = times(sde)
    chosen = {eps, eps * (T / eps) ** (1 / 3), eps * (T / eps) ** (2 / 3), T / 4, T / 2, 3 * T / 4, T}
    return sorted(t for t in chosen if start < t and eps <= t <= T)


# -- Scalar (affine and general) modules: one dimension, x of shape [n, 1] ----------------------------------

def affine_coefficients(sde, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """a(t), b(t) and g(t) of an affine drift f = a x + b, from sde() at x = 0 and x = 1."""
    n = t.shape[0]
    f0, g = sde.sde(torch.zeros(n, 1, dtype=t.dtype, device=t.device), t)
    f1, _ = sde.sde(torch.ones(n, 1, dtype=t.dtype, device=t.device), t)
    return flat(f1 - f0, n, t), flat(f0, n, t), flat(g, n, t)


def affine_kernel(sde, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """m(t), c(t) and v(t) from marginal_prob() alone: its mean at x0 = 0 is c, at x0 = X it is m X + c. X = 2^1000,
    not 1: (m + c) - c loses m where it is below c's rounding (m = e^-77 beside c = 0.5, an OU process pulled to a
    mean at 100 times its rate, read as m = 0; e^-500 at its T); m X stands far above c, and the division by X is
    exact. Where m X overflows, the next of X = 2^500 and 1."""
    n = t.shape[0]
    c, std = sde.marginal_prob(torch.zeros(n, 1, dtype=t.dtype, device=t.device), t)
    c, std = flat(c, n, t), flat(std, n, t)
    m = None
    for scale in (2.0**1000, 2.0**500, 1.0):
        mc, _ = sde.marginal_prob(torch.full((n, 1), scale, dtype=t.dtype, device=t.device), t)
        estimate = (flat(mc, n, t) - c) / scale
        m = estimate if m is None else torch.where(torch.isfinite(m), m, estimate)
    return m, c, std**2


# -- Coupled modules: K components per data entry; one entry, u of shape [n, K] -------------------------------

def components(sde) -> int:
    """K, the number of state components per data entry (1 for scalar modules)."""
    return len(sde.components) if kind_of(sde) == "coupled" else 1


def coupled_coefficients(sde, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """F(t) [n, K, K], the constant term f(0) [n, K] (zero for the SDEs sdelang compiles) and g(t) [n, K]
    from sde() alone: column j of F is f(e_j) - f(0), for the basis states e_j of one data entry."""
    n, K = t.shape[0], components(sde)
    f0, g = sde.sde(torch.zeros(n, K, dtype=t.dtype, device=t.device), t)
    basis = torch.eye(K, dtype=t.dtype, device=t.device)
    columns = [sde.sde(basis[j].expand(n, K), t)[0] - f0 for j in range(K)]
    return torch.stack(columns, -1), f0, g


def initial_mean(sde) -> torch.Tensor:
    """u0 - x0 e_data: the initial means of the auxiliary components, 0 at the data, float64 [K]."""
    mean = sde.mean0.to(torch.float64).clone()
    mean[sde.data_index] = 0
    return mean


def data_column(sde, Phi: torch.Tensor) -> torch.Tensor:
    """Phi e_data [n, K]: how u_t depends on the data."""
    return Phi[:, :, sde.data_index]


def inversion_rounding(Sigma: torch.Tensor) -> torch.Tensor:
    """[n] the relative error that rounding alone gives a float64 inverse of Sigma [n, K, K] (or of a Schur
    complement in it): K u cond(C), C = Sigma / sqrt(Sigma_ii Sigma_jj) the correlation matrix. Near t = 0 a chain's
    components are nearly collinear (cond(C) ~ 1e13 for a third-order chain at t = 1e-5), and a reference computed
    from Sigma in float64 is no better than this, however right the module is."""
    d = Sigma.diagonal(dim1=-2, dim2=-1).sqrt()
    C = Sigma / (d[..., :, None] * d[..., None, :])
    return Sigma.shape[-1] * torch.finfo(torch.float64).eps * torch.linalg.cond(C)
