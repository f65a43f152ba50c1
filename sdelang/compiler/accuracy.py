"""Compile-time check of a scalar SDE's numeric tables against an independent solution.

The generated module is run at the default parameters, in float64 (the one place the compiler
imports torch, and only for SDEs with tables), and its m, c, std, log_snr, t_cdf and t_icdf at times
that are not its nodes are compared with a DOP853 solution (rtol 1e-12) of

    A' = a,  I' = g^2 e^{-2A},  J' = b e^{-A},  W' = |b| e^{-A}   (from 0),   K' = lambda / v   (from eps)

(from 1e-12 eps where the coefficients are not finite at 0)
with m = e^A, v = e^{2A} (v0 + I), c = e^A J (its scale e^A W where c passes 0) and Q = K / K(T),
evaluated from the program's own a, b, g^2 and weighting with SymPy's lambdify, never from the
module's code. Where e^{-A} overflows (|A| past 709: an OU process with rate 500 on [0, 1]) the moments
are integrated as they are instead, v' = 2 a v + g^2 (v(0) = v0), c' = a c + b, (e^A W)' = a e^A W + |b|,
a little less accurate (1e-10 rather than 1e-12 on examples/numeric.sde); before, the solver went on in
steps of no size until the compile's CPU limit stopped it. The errors go into the module's docstring;
one above BOUND is a warning.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import sympy as sp

from .derive import Derivation
from .derive.symbolic import NUMERIC

BOUND = 1e-7        # float64 relative error promised for numeric quantities on [eps, T]
POINTS = 120        # check times: half log-spaced, half uniform at random (fixed seed)
RTOL = 1e-12        # the reference solver's relative tolerance


@dataclass(frozen=True)
class Report:
    errors: dict[str, float]  # quantity -> largest error (relative; logSNR and Q: see _errors)
    problem: str = ""         # why the check could not run, if it could not

    @property
    def worst(self) -> float:
        return max(self.errors.values(), default=math.inf)

    @property
    def ok(self) -> bool:
        return not self.problem and self.worst <= BOUND

    def text(self) -> str:
        """One docstring paragraph: decades, so that the text is the same wherever it is compiled."""
        if self.problem:
            return f"NOT checked at compile time: {self.problem}."
        parts = ", ".join(f"{name} < {_decade(err)}" for name, err in self.errors.items())
        verdict = "within" if self.ok else "ABOVE"
        return (f"Checked at compile time at the default parameters, in float64, at {POINTS} times in [eps, T] "
                f"that are not table nodes, against a DOP853 solution (rtol {RTOL:g}) of the moment equations:\n"
                f"largest relative error {parts}; {verdict} the bound {BOUND:g}.")

    def warning(self) -> str | None:
        if self.ok:
            return None
        if self.problem:
            return f"the numeric tables were not checked: {self.problem}"
        return (f"the numeric tables reach only {self.worst:.1e} relative error (bound {BOUND:g}): "
                + ", ".join(f"{k} {v:.1e}" for k, v in self.errors.items()))


def _decade(err: float) -> str:
    if not math.isfinite(err):
        return "inf"
    return f"1e{max(math.ceil(math.log10(max(err, 1e-300)) + 1e-9), -16)}"


def check_tables(d: Derivation, code: str) -> Report:
    """Run the emitted module and measure its tables (see the module docstring)."""
    import torch  # only here: SDEs without tables never pay for it

    p = d.program
    defaults = {k: sp.sympify(v) for k, v in p.defaults.items()}
    eps, T, v0 = (float(e.xreplace(defaults)) for e in (p.eps, p.T, p.v0))
    namespace: dict = {}
    try:
        exec(compile(code, f"<module of {p.name}>", "exec"), namespace)
        sde = namespace["SDE"]().double()
    except ValueError as exc:
        return Report({}, f"the module cannot be built: {exc}")
    rng = np.random.default_rng(0)
    low = eps if eps > 0 else T * 1e-9
    ts = np.unique(np.concatenate([np.geomspace(low, T, POINTS // 2), rng.uniform(low, T, POINTS - POINTS // 2)]))
    try:
        reference = _Reference(d, defaults, eps, T, v0)
        ref = reference.solve(ts)
    except (ArithmeticError, ValueError, TypeError) as exc:
        return Report({}, f"the reference solution failed ({exc})")
    at = torch.tensor(ts, dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: a thread pool only costs, and much on a loaded machine
    try:
        return _measure(d, sde, reference, ref, ts, at, eps, T)
    finally:
        torch.set_num_threads(threads)


def _measure(d, sde, reference, ref, ts, at, eps, T) -> Report:
    import torch

    p = d.program
    with torch.no_grad():
        got = {"m": sde.mean_coeff(at), "c": sde.mean_offset(at), "std": sde.std(at), "logSNR": sde.log_snr(at)}
        got = {k: np.broadcast_to(v.numpy(), ts.shape) for k, v in got.items()}
        errors = {
            "m": _relative(got["m"], ref["m"]),
            "c": float(np.max(np.abs(got["c"] - ref["c"]) / np.maximum(np.abs(ref["c"]), ref["c_scale"] + 1e-300))),
            "std": _relative(got["std"], ref["std"]),
            # logSNR passes 0 (at v = m^2): relative to max(|logSNR|, 1).
            "logSNR": float(np.max(np.abs(got["logSNR"] - ref["logSNR"]) / np.maximum(np.abs(ref["logSNR"]), 1.0))),
        }
        if p.t_sampling == "importance" and "Q" in ref:
            errors["t_cdf"] = float(np.max(np.abs(sde.t_cdf(at).numpy() - ref["Q"])))  # Q in [0, 1]: absolute
            u = np.linspace(0.0, 1.0, POINTS + 1)[1:-1] + 0.3 / POINTS  # not the u-table's nodes either
            t_of_u = np.clip(sde.t_icdf(torch.tensor(u, dtype=torch.float64)).numpy(), eps, T)
            back = reference.solve(t_of_u)
            # Q(t_icdf(u)) - u, as a relative error of t: dt = dQ / q(t).
            errors["t_icdf"] = float(np.max(np.abs(back["Q"] - u) / (back["q"] * t_of_u)))
        if _tabulated(d, "G"):
            errors["G"] = _step_error(sde, reference, ts, eps, T)
    return Report({k: v for k, v in errors.items() if _tabulated(d, k)}, "")


def _step_error(sde, reference, ts, eps, T) -> float:
    """The largest relative error of discretize's noise G over steps [s, t] ending at every sixth check time:
    the default step T/N, a thousandth of t and half of t (s >= eps), against the step's own variance
    w(t), w' = 2 a w + g^2 from w(s) = 0. (G^2 read as a difference of table values cancels where the variance
    barely changes in relative terms over the step: a state that grows, v ~ e^{2A}.)"""
    import torch

    t = ts[::6]
    s = np.concatenate([np.maximum(t - T / sde.N, eps), np.maximum(t * 0.999, eps), np.maximum(t / 2, eps)])
    t = np.tile(t, 3)
    keep = s < t
    t, s = t[keep], s[keep]
    with torch.no_grad():
        _, G = sde.discretize(torch.zeros(len(t), 1, dtype=torch.float64), torch.tensor(t), torch.tensor(s))
    want = np.sqrt([reference.step_variance(lo, hi) for lo, hi in zip(s, t)])
    return _relative(G.reshape(-1).numpy(), want)


def _relative(got, want) -> float:
    with np.errstate(all="ignore"):
        err = np.abs(got / want - 1)
    return float(np.max(np.where(np.isfinite(err), err, np.inf)))


def _tabulated(d: Derivation, name: str) -> bool:
    """Report only what reads a table (closed forms are checked elsewhere)."""
    k = d.kernel
    expr = {"m": k.m, "c": k.c, "std": k.std, "logSNR": d.log_snr, "t_cdf": d.importance.cdf,
            "G": d.step.variance}.get(name)
    return expr is None or expr.has(*NUMERIC)


class _FactorOverflow(ArithmeticError):
    """e^{-A} left float64's range: the integrating-factor form cannot go on."""


class _Reference:
    """The moment equations of the program, solved by SciPy (see the module docstring)."""

    def __init__(self, d: Derivation, defaults: dict, eps: float, T: float, v0: float):
        t = d.program.t
        self.eps, self.T, self.v0 = eps, T, v0

        def fn(expr):
            return sp.lambdify(t, expr.xreplace(defaults), modules="numpy")

        self.a, self.b, self.g2 = fn(d.a), fn(d.b), fn(d.g2)
        p = d.program
        self.kind = p.weighting
        self.lam = None if d.weight.has(*NUMERIC) else fn(d.weight)

    def _rhs(self, t, y, from_eps, factor):
        """factor: y = (A, I, J, W, K), the integrating-factor form; otherwise y = (A, v, c, e^A W, K)."""
        with np.errstate(all="ignore"):   # a pole is a non-finite value here, handled by the caller
            a, b, g2 = (float(np.broadcast_to(f(t), ())) for f in (self.a, self.b, self.g2))
            lam = float(np.broadcast_to(self.lam(t), ())) if from_eps and self.lam is not None else 0.0
        A, second, c, w, _ = y
        if not all(map(math.isfinite, y)):   # a stage past float64's range: the solver would shrink its steps forever
            raise _FactorOverflow if factor else ArithmeticError("the moments leave float64's range")
        if not factor:
            return [a, 2 * a * second + g2, a * c + b, a * w + abs(b), lam / second if lam else 0.0]
        try:
            e = math.exp(-A)
            out = [a, g2 * e * e, b * e, abs(b) * e, lam / (self.v0 + second) * e * e if lam else 0.0]
        except (OverflowError, ZeroDivisionError):
            raise _FactorOverflow from None
        if math.isfinite(a + b + g2 + lam) and not all(map(math.isfinite, out)):
            raise _FactorOverflow
        return out

    def step_variance(self, s: float, t: float) -> float:
        """G^2 of the step [s, t]: w(t) for w' = 2 a w + g^2, w(s) = 0."""
        import scipy.integrate

        def rhs(u, w):
            with np.errstate(all="ignore"):
                a, g2 = (float(np.broadcast_to(f(u), ())) for f in (self.a, self.g2))
            return [2 * a * w[0] + g2]
        with np.errstate(all="ignore"):   # w(s) = 0: the first step's error norm divides by atol
            sol = scipy.integrate.solve_ivp(rhs, (s, t), [0.0], method="DOP853", rtol=RTOL, atol=1e-300)
        if not sol.success:
            raise ArithmeticError(sol.message)
        return float(sol.y[0, -1])

    def solve(self, ts: np.ndarray) -> dict:
        """The reference quantities at the times ts (in [eps, T])."""
        # A stage past float64's range warns inside SciPy before _rhs sees it: nothing for the user's terminal.
        with np.errstate(all="ignore"):
            try:
                return self._solve(ts, factor=True)
            except _FactorOverflow:
                return self._solve(ts, factor=False)

    def _solve(self, ts: np.ndarray, factor: bool) -> dict:
        import scipy.integrate

        tol = dict(method="DOP853", rtol=RTOL, atol=1e-40)
        start = [0.0] * 5 if factor else [0.0, self.v0, 0.0, 0.0, 0.0]
        if self.eps > 0:
            # Coefficients singular at t = 0 (a logSNR given as -2 log tan(pi t / 2): inf * 0 there) start the
            # solution at 1e-12 eps from the zero state; an integrand ~ t^k leaves out (1e-12)^(k + 1) of its
            # integral at eps: 1e-12 for a bounded one (g^2 ~ t for the cosine schedules).
            origin = 0.0 if np.isfinite(self._rhs(0.0, start, False, factor)).all() else 1e-12 * self.eps
            first = scipy.integrate.solve_ivp(self._rhs, (origin, self.eps), start, args=(False, factor), **tol)
            if not first.success:
                raise ArithmeticError(first.message)
            start = list(first.y[:, -1])
            start[4] = 0.0
        points = np.unique(np.concatenate([ts, [self.eps, self.T]]))
        sol = scipy.integrate.solve_ivp(self._rhs, (points[0], points[-1]), start, t_eval=points, args=(True, factor),
                                        **tol)
        if not sol.success:
            raise ArithmeticError(sol.message)
        A, second, c, w, K = sol.y
        m = np.exp(A)
        if factor:
            v, c, w = np.exp(2 * A) * (self.v0 + second), m * c, m * w
            lsnr = -np.log(self.v0 + second)   # log(m^2 / v)
        else:
            v = second
            lsnr = 2 * A - np.log(v)
        out = {"m": m, "c": c, "c_scale": w, "std": np.sqrt(v), "logSNR": lsnr}
        if self.lam is not None:
            lam = np.array([float(np.broadcast_to(self.lam(s), ())) for s in points])
            if self.kind == "likelihood":
                # Q is uniform in logSNR (MATH.md 3): from the same solution, at eps and T.
                Z = lsnr[0] - lsnr[-1]
                out["Q"], out["q"] = (lsnr[0] - lsnr) / Z, lam / v / Z
            else:
                out["Q"], out["q"] = K / K[-1], lam / v / K[-1]
        where = np.searchsorted(points, ts)
        return {k: val[where] for k, val in out.items()}
