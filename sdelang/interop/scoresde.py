"""A compiled affine SDE as score_sde_pytorch's code expects one (docs/interop.md, "score_sde").

score_sde's `get_score_fn`, losses, predictors and correctors dispatch on `isinstance(sde, VPSDE /
subVPSDE / VESDE)` and read discrete tables. `adapt(sde)` returns a view of the compiled module whose
class is registered as a virtual subclass of the matching `sde_lib` class, chosen from the kernel:

    VESDE     m(t) = 1 and c(t) = 0: the model's output is read as the score (score_sde's VE branch);
    VPSDE     m^2 + v = 1 and c = 0 (variance preserving): output read as noise, score = -output / std;
    subVPSDE  every other affine SDE: output read as noise (the same scaling, always continuous labels),
              its ancestral predictor and DDPM loss are refused by score_sde, as for its own subVP.

The tables, for any affine SDE, on the grid t_i = (i + 1) T / N, i = 0 .. N - 1 (DDPM's x_{i+1} after
i + 1 steps of T / N; score_sde's samplers read entry floor(t (N - 1) / T) at time t):

    alphas[i]                 = (m(t_i) / m(t_i - T/N))^2   squared mean ratio of the step into t_i
    discrete_betas[i]         = v(t_i) - alphas[i] v(t_i - T/N), with m := 1, v := 0 before the first step
                                (the step from the data, even where m(0) != 1): the step's noise variance
    alphas_cumprod[i]         = m(t_i)^2 = prod_{j <= i} alphas[j]
    sqrt_alphas_cumprod[i]    = m(t_i),    sqrt_1m_alphas_cumprod[i] = sqrt(v(t_i))
    discrete_sigmas[i]        = sqrt(v(t_i)) / m(t_i)     the noise level in data units

For a VP SDE alphas + betas = 1 and sqrt_1m_alphas_cumprod = sqrt(1 - alphas_cumprod), as in DDPM; for
a VE SDE alphas = 1 and betas[i] = sigma_i^2 - sigma_{i-1}^2, as in NCSN. discretization="score_sde"
(VP and VE roles only) uses score_sde's own tables instead (betas = g(i T/(N-1))^2 T / N, alphas =
1 - betas, cumulative products; sigmas = std(i T/(N-1))) and its table-driven discretize.
"""
from __future__ import annotations

import importlib
import math

import torch

from ..runtime.kinds import kind_of

ROLES = ("VESDE", "VPSDE", "subVPSDE")
DISCRETIZATIONS = ("exact", "score_sde")
TABLES = ("discrete_betas", "alphas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_1m_alphas_cumprod",
          "discrete_sigmas")
# Relative tolerance of the role tests on the kernel (float64 evaluations of closed forms or quadrature).
ROLE_TOLERANCE = 1e-9


def role(sde) -> str:
    """"VESDE", "VPSDE" or "subVPSDE": the score_sde class whose branches are right for this SDE,
    from its kernel on 257 times in [0, T] (float64)."""
    if kind_of(sde) != "affine":
        raise ValueError(f"score_sde's classes describe SDEs with a scalar Gaussian kernel; this module is "
                         f"{kind_of(sde)!r}: its discrete tables (alphas, discrete_betas, ...) and score "
                         f"scaling have no meaning. Use sdelang's own samplers and likelihood for it")
    t = torch.linspace(0.0, float(sde.T), 257, dtype=torch.float64, device=sde._anchor.device)
    m, c, v = sde.mean_coeff(t), sde.mean_offset(t), sde.std(t) ** 2
    scale = float(m.abs().max() + v.sqrt().max())
    if float(c.abs().max()) > ROLE_TOLERANCE * scale:
        return "subVPSDE"
    if float((m - 1).abs().max()) <= ROLE_TOLERANCE:
        return "VESDE"
    if float((m**2 + v - 1).abs().max()) <= ROLE_TOLERANCE:
        return "VPSDE"
    return "subVPSDE"


def _tables(sde, role_name: str, discretization: str) -> dict[str, torch.Tensor]:
    """The six tables in float64 (module docstring)."""
    N, T = int(sde.N), float(sde.T)
    i = torch.arange(N, dtype=torch.float64, device=sde._anchor.device)
    if discretization == "exact":
        t, s = (i + 1) * T / N, i * T / N
        m_t, m_s, v_t, v_s = sde.mean_coeff(t), sde.mean_coeff(s), sde.std(t) ** 2, sde.std(s) ** 2
        # The first step starts from the data itself, x = x0 (m = 1, v = 0), not from the kernel at t = 0: with
        # m(0) != 1 (a logSNR given with a finite value at 0, VDM) (m(t_0) / m(0))^2 broke both
        # cumprod(alphas) = alphas_cumprod and, for VP, alphas + betas = 1 at i = 0.
        m_s = torch.where(i == 0, torch.ones_like(m_s), m_s)
        v_s = torch.where(i == 0, torch.zeros_like(v_s), v_s)
        alphas = (m_t / m_s) ** 2
        betas = v_t - alphas * v_s
        if role_name == "VESDE":
            alphas = torch.ones_like(alphas)
        return {"discrete_betas": betas, "alphas": alphas, "alphas_cumprod": m_t**2,
                "sqrt_alphas_cumprod": m_t, "sqrt_1m_alphas_cumprod": v_t.sqrt(), "discrete_sigmas": v_t.sqrt() / m_t}
    t = i * T / (N - 1)
    if role_name == "VPSDE":
        betas = sde.sde(t.new_zeros(N), t)[1] ** 2 * T / N
        if float(betas.max()) >= 1:
            enough = math.floor(float(betas.max()) * N) + 1
            raise ValueError(f"score_sde's discrete_betas reach {float(betas.max()):.3g} >= 1 at N = {N} (g(t)^2 T/N "
                             f"at t = T), where its step sqrt(1 - beta) x has no meaning; use discretization "
                             f"'exact' or N >= {enough}")
        alphas = 1 - betas
        cumprod = torch.cumprod(alphas, 0)
        return {"discrete_betas": betas, "alphas": alphas, "alphas_cumprod": cumprod,
                "sqrt_alphas_cumprod": cumprod.sqrt(), "sqrt_1m_alphas_cumprod": (1 - cumprod).sqrt(),
                "discrete_sigmas": ((1 - cumprod) / cumprod).sqrt()}
    sigmas = sde.std(t)
    previous = torch.cat([sigmas.new_zeros(1), sigmas[:-1]])
    ones = torch.ones_like(sigmas)
    return {"discrete_betas": sigmas**2 - previous**2, "alphas": ones, "alphas_cumprod": ones,
            "sqrt_alphas_cumprod": ones, "sqrt_1m_alphas_cumprod": sigmas, "discrete_sigmas": sigmas}


class ScoreSdeView:
    """A compiled affine SDE with what score_sde's code reads: the wrapped module's methods and
    attributes, the discrete tables, `discretize` and `reverse` as described in the module docstring.
    Build it with `adapt`."""

    role = None  # the score_sde class name, set on the three subclasses below

    def __init__(self, sde, discretization: str = "exact"):
        self.module = sde
        self.discretization = discretization
        dtype = sde._anchor.dtype
        for name, table in _tables(sde, type(self).role, discretization).items():
            setattr(self, name, table.to(dtype))

    def __getattr__(self, name):
        # Only reached for names the view does not define: sde, marginal_prob, prior_sampling, T, N, ...
        if name == "module":
            raise AttributeError(name)
        return getattr(self.module, name)

    def to(self, *args, **kwargs) -> "ScoreSdeView":
        """Moves the module and the tables (as torch.nn.Module.to does); returns the view, not the module."""
        self.module.to(*args, **kwargs)
        for name in TABLES:
            setattr(self, name, getattr(self, name).to(*args, **kwargs))
        return self

    def __repr__(self):
        return f"{type(self).__name__}({type(self.module).__name__}, discretization={self.discretization!r})"

    def discretize(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor | None = None):
        """(f, G) of the forward step into t: x_t = x + f + G z.

        "exact": the kernel's transition from s (default t - T/N) to t (the module's own discretize),
        except that a step starting at s <= 0 starts from the data (v(s) := 0), so that the last step of
        a reverse sampler removes all the noise at t, as score_sde's own VE and VP first steps do.
        "score_sde": score_sde's table step at i = floor(t (N - 1) / T): f = (sqrt(alphas[i]) - 1) x,
        G = sqrt(discrete_betas[i]); s must be None (the tables fix the step).
        """
        sde = self.module
        if self.discretization == "score_sde":
            if s is not None:
                raise ValueError("discretization 'score_sde' steps on score_sde's grid only; pass s=None")
            index = (t * (sde.N - 1) / sde.T).long().clamp(0, sde.N - 1)
            alpha = self.alphas.to(x.device)[index]
            f = sde._expand(alpha.sqrt() - 1, x) * x
            return f, self.discrete_betas.to(x.device)[index].sqrt()
        if s is None:
            s = torch.clamp(t - sde.T / sde.N, min=0.0)
        m_t, m_s = sde.mean_coeff(t), sde.mean_coeff(s)
        r = m_t / m_s
        v_s = torch.where(s > 0, sde.std(s) ** 2, torch.zeros_like(s))
        f = sde._expand(r - 1, x) * x + sde._expand(sde.mean_offset(t) - r * sde.mean_offset(s), x)
        return f, torch.sqrt(torch.clamp(sde.std(t) ** 2 - r**2 * v_s, min=0.0))

    def reverse(self, score_fn, probability_flow: bool = False):
        """The module's reverse-time SDE, stepping with this view's discretize. Its N is N / T: score_sde's
        Euler-Maruyama predictor steps dt = -1 / rsde.N, which is then -T / N, the step of the grid
        (score_sde's own SDEs have T = 1)."""
        rsde = self.module.reverse(score_fn, probability_flow)
        rsde.forward = self
        rsde.N = self.module.N / float(self.module.T)
        return rsde


class VPView(ScoreSdeView):
    role = "VPSDE"


class SubVPView(ScoreSdeView):
    role = "subVPSDE"


class VEView(ScoreSdeView):
    role = "VESDE"


VIEWS = {"VPSDE": VPView, "subVPSDE": SubVPView, "VESDE": VEView}


def _sde_lib(sde_lib):
    """score_sde's sde_lib module: the one given, else `import sde_lib` where score_sde is on the path."""
    if sde_lib is not None:
        return sde_lib
    try:
        return importlib.import_module("sde_lib")
    except ImportError:
        return None


def adapt(sde, *, discretization: str = "exact", sde_lib=None) -> ScoreSdeView:
    """The compiled affine SDE `sde` as a score_sde SDE: a view with the tables, whose class is registered
    as a virtual subclass of score_sde's class for its role (`role(sde)`) in `sde_lib` (score_sde's
    module; by default `import sde_lib` when that works, else no registration).

    discretization "exact" (any affine SDE) or "score_sde" (VP and VE roles: score_sde's own tables and
    steps, to float rounding for its VP and VE).
    """
    if discretization not in DISCRETIZATIONS:
        raise ValueError(f"discretization must be one of {', '.join(DISCRETIZATIONS)}; got {discretization!r}")
    name = role(sde)
    if discretization == "score_sde" and name == "subVPSDE":
        raise ValueError("discretization 'score_sde' reproduces score_sde's VP and VE tables; this SDE's role "
                         "is subVPSDE, for which score_sde defines no discrete steps: use 'exact'")
    if int(sde.N) < 2:
        raise ValueError(f"score_sde's grids need N >= 2 steps, got N = {sde.N!r}")
    view = VIEWS[name](sde, discretization)
    lib = _sde_lib(sde_lib)
    if lib is not None:
        getattr(lib, name).register(VIEWS[name])
    return view
