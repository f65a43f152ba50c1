"""Stage 3: IR -> derived quantities, one pure function per module."""
from __future__ import annotations

from dataclasses import dataclass, replace

import sympy as sp

from ..ir import CoupledProgram, Program
from .coupled import CoupledDerivation, derive_coupled
from .general import GeneralDerivation, derive_general
from .classify import classify
from .discretize import Step, discretize, from_head, head_integral, tail_helps, with_tail
from .divergence import drift_divergence
from .from_kernel import coefficients, given_kernel
from .importance import Importance, importance
from .kernel import Kernel, kernel, log_of_positive, tabulate_kernel
from .prior import prior
from .reverse import flow_drift, reverse_drift
from .snr import log_snr
from .symbolic import Accuracy, is_closed
from .tables import Tables
from .weighting import weighting

__all__ = ["CoupledDerivation", "Derivation", "GeneralDerivation", "derive"]


@dataclass(frozen=True)
class Derivation:
    program: Program
    a: sp.Expr
    b: sp.Expr
    g2: sp.Expr
    kernel: Kernel
    log_snr: sp.Expr
    reverse_drift: sp.Expr
    flow_drift: sp.Expr
    weight: sp.Expr
    importance: Importance
    prior_mean: sp.Expr
    prior_variance: sp.Expr
    step: Step
    divergence: sp.Expr
    tables: Tables  # the numeric tables the module builds (empty when every quantity has a closed form)

    @property
    def kernel_path(self) -> str:
        return "closed form" if self.kernel.closed_form else "numeric (piecewise Chebyshev tables)"

    @property
    def inverse_cdf_path(self) -> str:
        if self.program.t_sampling == "uniform":
            return "closed form (t ~ uniform)"
        return "closed form" if self.importance.inverse is not None else "numeric (piecewise Chebyshev table)"


def derive(p: Program | CoupledProgram) -> Derivation | GeneralDerivation | CoupledDerivation:
    """Every derived quantity of a checked program; the kind of program picks the derivations."""
    if isinstance(p, CoupledProgram):
        return derive_coupled(p)
    if not p.affine:
        return derive_general(p)
    return derive_affine(p)


def derive_affine(p: Program) -> Derivation:
    t = p.t
    defaults = p.defaults
    accuracy = Accuracy(defaults, float(p.eps.subs(defaults)), float(p.T.subs(defaults)))
    if p.given is None:
        # The kernel needs the affine split and g^2; everything after it needs the kernel.
        a, b = classify(p.drift, p.x)
        g2 = p.diffusion**2
        k = kernel(a, b, g2, p.v0, t, accuracy)
    else:
        # A stated kernel: the SDE is derived from it by differentiation, and the kernel is exact as given.
        k = given_kernel(p.given.m, p.given.c, p.given.v, t, accuracy)
        a, b, g2 = coefficients(p.given.m, p.given.c, p.given.v, t, p.given.log_snr, accuracy, k)
        # The SDE the checker derived, in these forms (chosen by their float32 error): sde(), reverse() and
        # the flow print from the program's drift and diffusion.
        p = replace(p, drift=a * p.x + b, diffusion=sp.sqrt(g2))
    # From here on a quantity with no closed form is a table lookup, never an Integral: nothing
    # downstream integrates numerically at compile time.
    tables = Tables(t, p.T)
    tail = None
    if p.given is None and not is_closed(k.v) and tail_helps(a, t, defaults, accuracy.T):
        # A state that grows: the step's noise from int_t^T g^2 / m^2 (see with_tail).
        s = sp.Dummy("s", positive=True)
        integral = sp.Integral((g2 / k.m**2).xreplace({t: s}), (s, t, p.T))
        tail = tables.tabulate(k.m**2 * integral, "m(t)^2 J(t), J(t) = int_t^T g^2 / m^2", absolute=False)
    # An initial variance v0 > 0 with v from the tables: the step's noise from log int_0^t g^2 / m^2 (see from_head).
    head = None
    if p.given is None and p.v0 != 0 and not is_closed(k.v) and k.vp_multiple is None:
        integral = head_integral(k, t)
        if integral is not None:
            head = tables.tabulate(log_of_positive(integral), "log I(t), I(t) = int_0^t g^2 / m^2", absolute=True)
    k = tabulate_kernel(k, t, tables)
    lsnr = log_snr(k, t, accuracy, p.given.log_snr if p.given is not None else None)
    lam = weighting(p.weighting, p.weighting_expr, g2, k.v)
    # The importance density is always derived (`sdelang show` reports it);
    # its inverse CDF only when the source samples t by importance.
    imp = importance(p.weighting, lam, k.v, lsnr, t, p.eps, p.T, defaults,
                     tables if p.t_sampling == "importance" else None, invert=p.t_sampling == "importance")
    mean, variance = prior(k, t, p.T, p.prior_mean, p.prior_variance, defaults)
    step = discretize(k, lsnr, t, accuracy, p.N)
    if head is not None:
        step = from_head(step, head, k.m, t)
    if tail is not None:
        step = with_tail(step, tail, k.v, t)
    return Derivation(p, a, b, g2, k, lsnr, reverse_drift(p.drift, g2), flow_drift(p.drift, g2), lam, imp,
                      mean, variance, step, drift_divergence(a), tables)
