"""The affine SDE of a process given by its transition kernel or by its log signal-to-noise ratio.

A kernel x_t ~ N(m(t) x0 + c(t), v(t)) is the law of dx = (a x + b) dt + g dw started from
x(0) ~ N(m(0) x0 + c(0), v(0)) exactly when m' = a m, c' = a c + b and v' = 2 a v + g^2, so

    a(t) = m'(t) / m(t) = d/dt log m,     b(t) = c' - a c,     g(t)^2 = v' - 2 a v = -v d/dt logSNR,

with logSNR = log(m^2 / v): no integral, and the kernel is exact by construction. g^2 > 0 exactly where
logSNR decreases. A variance-preserving process given by lambda(t) = logSNR(t) (VDM) has
m^2 = sigmoid(lambda), v = sigmoid(-lambda), c = 0.
"""
from __future__ import annotations

import functools

import sympy as sp

from .kernel import Kernel
from .signs import derivative
from .symbolic import Accuracy, exponential_differences, rewrites, simplest


def from_log_snr(lam: sp.Expr) -> tuple[sp.Expr, sp.Expr, sp.Expr]:
    """(m, c, v) of the variance-preserving kernel with logSNR lam: m^2 = sigmoid(lam), v = sigmoid(-lam)."""
    return sp.sqrt(1 / (1 + sp.exp(-lam))), sp.Integer(0), 1 / (1 + sp.exp(lam))


def coefficients(m: sp.Expr, c: sp.Expr, v: sp.Expr, t: sp.Symbol,
                 lam: sp.Expr | None = None, accuracy: Accuracy | None = None,
                 kernel: Kernel | None = None) -> tuple[sp.Expr, sp.Expr, sp.Expr]:
    """(a, b, g^2) of the SDE whose kernel is N(m x0 + c, v); ``lam`` is logSNR when it was given.

    g^2 has two equivalent forms, v' - 2 a v and -v logSNR'; the shorter after simplification is kept. With
    ``accuracy`` and the ``kernel`` in its chosen forms, a and g^2 are also derived from those forms, and the
    most accurate in float32 is kept: a = d/dt log m from m = sqrt(P expm1(k (t - 1))) keeps the digits that
    d/dt log(sigmoid(end) - sigmoid(z(t))) loses near T (a sigmoid schedule's drift, 1e-4 off at t = 0.999).
    """
    a, b, g2 = _derived(m, c, v, t, lam)
    if lam is not None or accuracy is None or kernel is None or kernel.m == m and kernel.v == v:
        return a, b, g2
    a_kept = derivative(sp.expand_log(sp.log(kernel.m), force=True), t)
    a = accuracy.best([a, a_kept, simplest(a_kept)], t)
    g2_kept = derivative(kernel.v, t) - 2 * a * kernel.v
    g2 = accuracy.best([g2, g2_kept, simplest(g2_kept)], t)
    b = sp.Integer(0) if c == 0 else simplest(derivative(c, t) - a * c)
    return a, b, g2


@functools.lru_cache(maxsize=16)
def _derived(m: sp.Expr, c: sp.Expr, v: sp.Expr, t: sp.Symbol, lam: sp.Expr | None) -> tuple[sp.Expr, sp.Expr, sp.Expr]:
    """(a, b, g^2) from the kernel as stated, each in its shortest form. Cached: the checks derive them first (to
    check g^2 > 0) and the derivation again from the same kernel (1-2 s of simplify for a sigmoid schedule)."""
    if lam is not None:
        # Variance preserving: a = lam' sigmoid(-lam) / 2, g^2 = -lam' sigmoid(-lam), written with
        # 1 + exp(lam) so that a large logSNR gives 0 rather than inf / inf.
        rate = simplest(derivative(lam, t))
        return rate / (2 * (1 + sp.exp(lam))), sp.Integer(0), -rate / (1 + sp.exp(lam))
    a = simplest(derivative(sp.expand_log(sp.log(m), force=True), t))
    b = sp.Integer(0) if c == 0 else simplest(derivative(c, t) - a * c)
    forms = [derivative(v, t) - 2 * a * v, -v * derivative(sp.expand_log(sp.log(m**2 / v), force=True), t)]
    g2 = min((simplest(f) for f in forms), key=lambda e: (sp.count_ops(e), sp.default_sort_key(e)))
    return a, b, g2


def given_kernel(m: sp.Expr, c: sp.Expr, v: sp.Expr, t: sp.Symbol, accuracy: Accuracy) -> Kernel:
    """The stated kernel itself, each part in its most accurate float32 form among a few rewrites."""
    vs = rewrites(v) + exponential_differences(v, t)
    stds = [sp.sqrt(u) for u in vs] + [simplest(sp.sqrt(v))]
    ms = rewrites(m) + exponential_differences(m, t)
    # |u| with u of one sign on [eps, T], proved: u or -u, which the rewrites can work on (a cosine logSNR gives
    # m = |sin(pi (t - 1) / 2)|, whose ratio over a step cancels; as cos(pi t / 2) it is a product of sines).
    for forms in (ms, stds):
        forms += [r for f in list(forms) if (u := _signs_resolved(f, t, accuracy)) is not None for r in rewrites(u)]
    return Kernel(accuracy.best(ms, t), accuracy.best(rewrites(c), t) if c != 0 else c,
                  accuracy.best(vs, t), accuracy.best(stds, t))


def _signs_resolved(expr: sp.Expr, t: sp.Symbol, accuracy: Accuracy) -> sp.Expr | None:
    """expr with each |u| (u a function of t alone) replaced by u or -u where check/sign.py proves u of one sign on
    [eps, T]; None if none is."""
    from ..check.sign import decide  # here: the check package imports this module
    lo, hi = sp.Rational(accuracy.eps), sp.Rational(accuracy.T)
    replaced = {}
    for a in expr.atoms(sp.Abs):
        u = a.args[0]
        if u.free_symbols != {t}:
            continue
        for sign in (1, -1):
            proved, failure = decide(sign * u, t, lo, hi)
            if proved and failure is None:
                replaced[a] = sign * u
                break
    return expr.xreplace(replaced) if replaced else None

