"""Integrals of schedules with a kink: integrands polynomial in s and |u(s)|, u = alpha s + beta with alpha a number.

With |u|^2 = u^2 such an integrand is f = P(u) + |u| Q(u), P and Q polynomials. For sigma = +1 or -1,
f = R(u) + (|u| - sigma u) Q(u) with R = P + sigma u Q, and since d/du [u^(j+1) |u|] = (j + 2) u^j |u|,

    int_L^U f ds = int_L^U R(u(s)) ds + (H(u(U)) - H(u(L))) / alpha,
    H(u) = sum_j q_j u^(j+1) (|u| - sigma u) / (j + 2),        Q(u) = sum_j q_j u^j,

exactly, for every value of the parameters. sigma is the sign of u just after L at the default parameters: then
|u| - sigma u is 0 (exactly, in floating point too) from L up to the kink, H(u(L)) is 0, and the integral there is
the polynomial int R alone. Written as F(U) - F(L) with F(s) = int |u| instead, it would be a difference of two
values of size beta^2 near s = L, which loses the digits of a small integral (for beta = 1 + 10 |t - 0.4|, some
4e-3 relative at t = 1e-5 in float32).
"""
from __future__ import annotations

import sympy as sp


def kink_integral(body: sp.Expr, var: sp.Symbol, lower: sp.Expr, upper: sp.Expr,
                  defaults: dict | None = None) -> sp.Expr | None:
    """int_lower^upper body d(var) in closed form when body is polynomial in var and |u| for one u linear in var
    (with a number as slope), else None. ``defaults`` (parameter values) choose sigma; without them, or where u
    just after lower has no sign at them, sigma is +1 (exact still, with the cancellation described above)."""
    kinks = [a for a in body.atoms(sp.Abs) if a.has(var)]
    if not kinks:
        return None
    u = sp.expand(kinks[0].args[0])
    if any(sp.expand(k.args[0] - u) != 0 and sp.expand(k.args[0] + u) != 0 for k in kinks[1:]):
        return None
    alpha = sp.diff(u, var)
    if not (alpha.is_Number and alpha != 0) or sp.diff(u, var, 2) != 0:
        return None
    U, Y = sp.Dummy("u"), sp.Dummy("y")
    in_u = body.xreplace({k: Y for k in kinks}).xreplace({var: (U - u.xreplace({var: 0})) / alpha})
    if in_u.has(var) or not in_u.is_polynomial(U, Y):
        return None
    P, Q = sp.Integer(0), sp.Integer(0)
    for (i, k), coefficient in sp.Poly(in_u, U, Y).terms():
        if coefficient.has(sp.Abs):
            return None
        # Y^k = |u|^k: u^k for an even k, |u| u^(k-1) for an odd one.
        if k % 2 == 0:
            P += coefficient * U**(i + k)
        else:
            Q += coefficient * U**(i + k - 1)
    sigma = _sign_after(u, var, lower, alpha, defaults)
    R = sp.expand((P + sigma * U * Q).xreplace({U: u}))
    antiderivative = sp.integrate(R, var)  # a polynomial without a constant term
    H = sum((q * U**(j + 1) * (sp.Abs(U) - sigma * U) / (j + 2) for (j,), q in sp.Poly(Q, U).terms()),
            sp.Integer(0)) if Q != 0 else sp.Integer(0)
    return (antiderivative.xreplace({var: upper}) - antiderivative.xreplace({var: lower})
            + (H.xreplace({U: u.xreplace({var: upper})}) - H.xreplace({U: u.xreplace({var: lower})})) / alpha)


def _sign_after(u: sp.Expr, var: sp.Symbol, lower: sp.Expr, alpha: sp.Expr, defaults: dict | None) -> int:
    """The sign of u just after var = lower at the default parameters: of u(lower), or of the slope where u(lower)
    is 0; +1 where it cannot be told."""
    at_lower = u.xreplace({var: lower})
    if defaults:
        at_lower = at_lower.xreplace({k: sp.Float(float(v), 30) for k, v in defaults.items()})
    if at_lower.is_zero:
        return 1 if alpha > 0 else -1
    if at_lower.is_number and at_lower.is_finite:
        return 1 if at_lower.evalf(30) > 0 else -1
    return -1 if at_lower.is_negative else 1
