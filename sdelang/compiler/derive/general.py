"""Derivations for an SDE with no Gaussian kernel: a drift not affine in x, or a diffusion g(x, t).

Each entry of x has its own noise, so D = G G^T is diagonal with entries g(x_i, t)^2 and
div(D)_i = d g^2 / dx evaluated at x_i (MATH.md section 2):

    reverse:  dx = [f - d(g^2)/dx - g^2 s] dt + g dw_bar
    flow:     dx/dt = f - 1/2 d(g^2)/dx - 1/2 g^2 s
    div_x f   = sum over the entries of df/dx (the template sums)

Without a kernel there is no m, c, v, logSNR or importance density; the checker has already refused
what needs them (t ~ importance, the sigma^2 weighting, a derived prior), and `unavailable` says
which generated methods are missing and why.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from ..ir import Program
from .reverse import SCORE


@dataclass(frozen=True)
class GeneralDerivation:
    program: Program
    g2: sp.Expr
    noise_gradient: sp.Expr   # d(g^2)/dx: the divergence of D, entrywise
    reverse_drift: sp.Expr
    flow_drift: sp.Expr
    divergence: sp.Expr       # df/dx, one entry's share of div f
    weight: sp.Expr
    prior_mean: sp.Expr
    prior_variance: sp.Expr
    unavailable: dict[str, str]

    kernel_path = "none (no Gaussian kernel)"
    inverse_cdf_path = "closed form (t ~ uniform)"


def reason(p: Program) -> str:
    """Why the SDE has no Gaussian transition kernel."""
    if p.diffusion.has(p.x):
        return f"the diffusion depends on {p.x}, so the transition kernel is not Gaussian"
    return f"the drift is not affine in {p.x}, so the transition kernel is not Gaussian"


def unavailable(p: Program) -> dict[str, str]:
    why = reason(p)
    kernel = f"no closed-form transition kernel: {why}"
    return {
        "marginal_prob": kernel,
        "mean_coeff": kernel,
        "mean_offset": kernel,
        "std": kernel,
        "log_snr": kernel,
        "importance sampling of t": f"q(t) is proportional to lambda(t) / v(t) and needs the kernel's variance: {why}",
        "denoising score matching": f"its target -z / sigma(t) is the kernel's score: {why}; training uses sliced "
                                    f"score matching on Euler-Maruyama simulations of x_t",
        "exact-kernel samplers (reverse_diffusion, ancestral, ald, ddim, dpm2)": kernel,
        "likelihood bound (ScoreFlow Theorem 3)": f"it integrates the kernel's score: {why}",
    }


def _almost_everywhere(expr: sp.Expr) -> sp.Expr:
    """expr with the Dirac deltas that d/dx of sign(x) (or of |x|'s derivative) brings dropped: the derivative
    almost everywhere, as autograd takes it. (Printed, a DiracDelta stopped the compile with an internal error.)"""
    return expr.replace(lambda e: isinstance(e, sp.DiracDelta), lambda e: sp.S.Zero)


def _sech_squared(expr: sp.Expr) -> sp.Expr:
    """c - c tanh(u)^2 (SymPy's derivative of tanh) as c / cosh(u)^2: in float32 the difference kept 6e-5 of the
    divergence of a tanh drift at |x| = 4 and nothing past |x| = 9 (float64: past 19)."""
    def rewrite(e):
        if len(e.args) != 2:
            return e
        for a, b in (e.args, e.args[::-1]):
            for f in sp.Mul.make_args(b):
                if f.is_Pow and f.exp == 2 and isinstance(f.base, sp.tanh) and b / f == -a:
                    return a / sp.cosh(f.base.args[0])**2
        return e
    return expr.replace(lambda e: e.is_Add, rewrite)


def derive_general(p: Program) -> GeneralDerivation:
    x = p.x
    g2 = p.diffusion**2
    gradient = _almost_everywhere(sp.diff(g2, x))
    weight = g2 if p.weighting == "likelihood" else p.weighting_expr
    assert p.prior_mean is not None and p.prior_variance is not None, "the checker requires a stated prior"
    return GeneralDerivation(
        program=p,
        g2=g2,
        noise_gradient=gradient,
        reverse_drift=p.drift - gradient - g2 * SCORE,
        flow_drift=p.drift - gradient / 2 - g2 * SCORE / 2,
        divergence=_sech_squared(_almost_everywhere(sp.diff(p.drift, x))),
        weight=weight,
        prior_mean=p.prior_mean,
        prior_variance=p.prior_variance,
        unavailable=unavailable(p),
    )
