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

import mpmath
import numpy as np
import sympy as sp

from .derive import Derivation
from .derive.signs import kinks
from .derive.symbolic import NUMERIC

BOUND = 1e-7        # float64 relative error promised for numeric quantities on [eps, T]
POINTS = 120        # check times: half log-spaced, half uniform at random (fixed seed)
RTOL = 1e-12        # the reference solver's relative tolerance
# Right-side evaluations a reference solve may take: a few thousand is usual (examples/numeric.sde 2,630), more is a
# solver whose steps collapse on coefficients that are float64 noise; it is then solved again, with 30-digit
# coefficients where float64 is noise, under the larger bound.
MAX_EVALUATIONS = {"numpy": 50_000, "mixed": 200_000}
STALL_EVALUATIONS = 5_000
NOISE = 1e-13  # the relative disagreement of float64 and 30-digit coefficients that counts as float64 noise


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

    with torch.device("cpu"):   # whatever default device the caller compiles under (meta: no values to measure)
        return _check_tables(d, code)


def _check_tables(d: Derivation, code: str) -> Report:
    import torch

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
        # Each kink and its neighbours in float64 too, where a table piece ends (the module breaks its pieces there).
        ts = np.unique(np.concatenate([ts, [x for k in reference.kinks for x in (np.nextafter(k, 0.0), k,
                                                                                np.nextafter(k, np.inf)) if low <= x <= T]]))
        ref = reference.solve(ts)
    except (ArithmeticError, ValueError, TypeError) as exc:
        return Report({}, f"the reference solution failed ({exc})")
    at = torch.tensor(ts, dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: a thread pool only costs, and much on a loaded machine
    try:
        return _measure(d, sde, reference, ref, ts, at, eps, T)
    except ArithmeticError as exc:
        return Report({}, f"the reference solution failed ({exc})")
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
    the default step T/N, a thousandth, a hundred-thousandth and half of t (s >= eps), and of 1e-5 of t ending and
    starting at each kink, against the step's own variance
    w(t), w' = 2 a w + g^2 from w(s) = 0. (G^2 read as a difference of table values cancels where the variance
    barely changes in relative terms over the step: a state that grows, v ~ e^{2A}.)"""
    import torch

    t = ts[::6]
    s = np.concatenate([np.maximum(t - T / sde.N, eps), np.maximum(t * 0.999, eps), np.maximum(t / 2, eps),
                        np.maximum(t * (1 - 1e-5), eps)])
    t = np.tile(t, 4)
    # Short steps ending at each kink and starting there (a jump of g^2 there left G 3.5e-6 off over 1e-5 of t).
    near = [k for k in reference.kinks if eps < k * (1 - 1e-5) and k * (1 + 1e-5) < T]
    s = np.concatenate([s, [k * (1 - 1e-5) for k in near], near])
    t = np.concatenate([t, near, [k * (1 + 1e-5) for k in near]])
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


class _Stalled(ArithmeticError):
    """The reference solver took MAX_EVALUATIONS evaluations without reaching its end."""


def _mp_softplus(u):
    return mpmath.log1p(mpmath.exp(u))


def _in_mpmath(f):
    """f evaluated with 30 digits, rounded to float64; NaN where it is not defined (0/0 at t = 0, as numpy's is)."""
    def at(t):
        with mpmath.workdps(30):
            try:
                value = f(mpmath.mpf(float(t)))
                return float(value) if mpmath.im(value) == 0 else math.nan
            except (ArithmeticError, ValueError, TypeError):
                return math.nan
    return at


class _FactorOverflow(ArithmeticError):
    """e^{-A} left float64's range: the integrating-factor form cannot go on."""


class _Reference:
    """The moment equations of the program, solved by SciPy (see the module docstring)."""

    def __init__(self, d: Derivation, defaults: dict, eps: float, T: float, v0: float):
        t = d.program.t
        self.eps, self.T, self.v0 = eps, T, v0

        weight = sp.Integer(0) if d.weight.has(*NUMERIC) else d.weight
        self._t, self._exprs = t, [e.xreplace(defaults) for e in (d.a, d.b, d.g2, weight)]
        self.weighted, self.kind, self.evaluations = weight != 0, d.program.weighting, 0
        self._at_eps: dict = {}
        self.kinks = kinks([d.a, d.b, d.g2, weight], t, eps, T, defaults)
        self._functions("numpy")
        # Coefficients singular at t = 0 (a logSNR given as -2 log tan(pi t / 2): inf * 0 there) start the solution at
        # 1e-12 eps (_solve); evaluated that near 0 their formula may cancel, so they are compared with 30 digits
        # from the start (solve).
        self.origin = 0.0 if eps <= 0 or np.isfinite(self._rhs(0.0, [0.0] * 5, False, True)).all() else 1e-12 * eps

    def _functions(self, modules) -> None:
        """a, b, g^2 and lambda as functions of t. "numpy": float64. "mixed": float64 where it agrees with a
        30-digit evaluation to NOISE at the neighbouring sample times, mpmath with 30 digits (rounded to float64)
        elsewhere: a formula that cancels in float64 (1 - 2 |t - 1/2| near t = 0) is noise there, and on noise the
        solver's steps shrink to nothing."""
        self.modules = modules
        fast = [sp.lambdify(self._t, e, modules="numpy") for e in self._exprs]
        if modules == "mixed":
            fast = self._mixed(fast)
        self.a, self.b, self.g2, lam = fast
        self.lam = lam if self.weighted else None

    def _mixed(self, fast: list) -> list:
        slow = [_in_mpmath(sp.lambdify(self._t, e, modules=[{"softplus": _mp_softplus}, "mpmath"]))
                for e in self._exprs]
        grid = np.unique(np.concatenate([np.geomspace(1e-12 * self.eps, self.T, 400),
                                         np.linspace(self.eps, self.T, 200)]))
        def noisy(f, g) -> np.ndarray:
            """Where f, in float64, or its neighbouring sample times, is off g's 30 digits by more than NOISE."""
            flags = np.zeros(len(grid), dtype=bool)
            with np.errstate(all="ignore"):
                for i, t in enumerate(grid):
                    try:
                        want = g(t)
                    except (ArithmeticError, ValueError, TypeError):
                        continue
                    flags[i] = not abs(float(np.broadcast_to(f(t), ())) - want) <= NOISE * abs(want)
            return flags | np.roll(flags, 1) | np.roll(flags, -1)

        def either(f, g):
            spread = noisy(f, g)
            if not spread.any():
                return f

            def at(t):
                i = min(np.searchsorted(grid, t), len(grid) - 1)
                return g(t) if spread[i] else f(t)
            return at
        return [either(f, g) for f, g in zip(fast, slow)]

    def _count(self, t: float) -> None:
        """Count an evaluation at t; raise _Stalled past the bound, or where STALL_EVALUATIONS evaluations (some 400
        steps) moved t by less than 1 % of itself: steps that have collapsed (on coefficients that are float64
        noise); a working solve takes steps of a few % of t at least, even where a coefficient oscillates fast."""
        self.evaluations += 1
        if self.evaluations > MAX_EVALUATIONS[self.modules]:
            raise _Stalled
        if self.evaluations % STALL_EVALUATIONS == 0:
            if self.evaluations > STALL_EVALUATIONS and abs(t - self._checkpoint) <= 1e-2 * abs(t):
                raise _Stalled
            self._checkpoint = t

    def _rhs(self, t, y, from_eps, factor):
        """factor: y = (A, I, J, W, K), the integrating-factor form; otherwise y = (A, v, c, e^A W, K)."""
        self._count(t)
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

    def _one_sided(self, rhs, lo: float, hi: float):
        """rhs on the stretch [lo, hi] with its value at an end that is a kink taken from inside the stretch: at the
        kink itself sign(0) = 0 is neither side's value, and one wrong value at a step's start keeps the error
        estimate from ever falling below the tolerance."""
        inner_lo = np.nextafter(lo, hi) if lo in self.kinks else lo
        inner_hi = np.nextafter(hi, lo) if hi in self.kinks else hi
        if inner_lo == lo and inner_hi == hi:
            return rhs
        return lambda t, y, *args: rhs(min(max(t, inner_lo), inner_hi), y, *args)

    def step_variance(self, s: float, t: float) -> float:
        """G^2 of the step [s, t]: w(t) for w' = 2 a w + g^2, w(s) = 0."""
        import scipy.integrate

        self.evaluations = 0

        def rhs(u, w):
            self._count(u)
            with np.errstate(all="ignore"):
                a, g2 = (float(np.broadcast_to(f(u), ())) for f in (self.a, self.g2))
            return [2 * a * w[0] + g2]
        w = [0.0]
        ends = [s, *(k for k in self.kinks if s < k < t), t]   # stretches between kinks, as in _solve
        for lo, hi in zip(ends[:-1], ends[1:]):
            with np.errstate(all="ignore"):   # w(s) = 0: the first step's error norm divides by atol
                sol = scipy.integrate.solve_ivp(self._one_sided(rhs, lo, hi), (lo, hi), w, method="DOP853",
                                                rtol=RTOL, atol=1e-300)
            if not sol.success:
                raise ArithmeticError(sol.message)
            w = [float(sol.y[0, -1])]
        return w[0]

    def solve(self, ts: np.ndarray) -> dict:
        """The reference quantities at the times ts (in [eps, T])."""
        # A stage past float64's range warns inside SciPy before _rhs sees it: nothing for the user's terminal.
        with np.errstate(all="ignore"):
            # Mixed from the start where the coefficients are singular at 0, elsewhere once the solver has stalled.
            if self.origin and self.modules == "numpy":
                self._functions("mixed")
            while True:
                self.evaluations = 0
                try:
                    try:
                        return self._solve(ts, factor=True)
                    except _FactorOverflow:
                        return self._solve(ts, factor=False)
                except _Stalled:
                    if self.modules == "mixed":
                        break
                    self._functions("mixed")
        raise ArithmeticError(f"its steps shrank to nothing: {MAX_EVALUATIONS['mixed']:,} evaluations of the moment "
                              f"equations, with their coefficients in float64 and then with 30 digits, did not "
                              f"reach T")

    def _from_zero(self, origin: float, start: list, factor: bool) -> list:
        """start + int_0^origin of each right side, taken as c t^k (k > -1) with c and k from its values at origin
        and 2 origin; a right side that is not such a power there contributes nothing."""
        near, far = (np.asarray(self._rhs(s, start, False, factor), dtype=float) for s in (origin, 2 * origin))
        with np.errstate(all="ignore"):
            k = np.log2(far / near)
            part = np.where(np.isfinite(k) & (k > -1) & np.isfinite(near), origin * near / (k + 1), 0.0)
        return [y + p for y, p in zip(start, part)]

    def _solve(self, ts: np.ndarray, factor: bool) -> dict:
        import scipy.integrate

        tol = dict(method="DOP853", rtol=RTOL, atol=1e-40)
        start = [0.0] * 5 if factor else [0.0, self.v0, 0.0, 0.0, 0.0]
        if self.eps > 0 and (factor, self.modules) in self._at_eps:
            start = self._at_eps[factor, self.modules]
        elif self.eps > 0:
            # From origin = 1e-12 eps where the coefficients are singular at 0, with each integral's part over
            # [0, origin] from a power law fitted at origin and 2 origin (an integrand ~ t^-1/2, the Laplace logSNR's,
            # leaves out 1e-6 of its integral at eps otherwise).
            if self.origin:
                start = self._from_zero(self.origin, start, factor)
            first = scipy.integrate.solve_ivp(self._rhs, (self.origin, self.eps), start, args=(False, factor), **tol)
            if not first.success:
                raise ArithmeticError(first.message)
            start = list(first.y[:, -1])
            start[4] = 0.0
            self._at_eps[factor, self.modules] = start   # the same for every solve
        points = np.unique(np.concatenate([ts, [self.eps, self.T]]))
        # One solve per stretch between kinks (|u|, sign(u) at u = 0): a step across one is interpolated there.
        ends = [points[0], *self.kinks, points[-1]]
        parts = []
        for lo, hi in zip(ends[:-1], ends[1:]):
            inside = points[(points >= lo) & (points <= hi)]
            sol = scipy.integrate.solve_ivp(self._one_sided(self._rhs, lo, hi), (lo, hi), start,
                                            t_eval=np.unique([lo, *inside, hi]), args=(True, factor), **tol)
            if not sol.success:
                raise ArithmeticError(sol.message)
            start = list(sol.y[:, -1])
            keep = np.isin(sol.t, inside) & (sol.t < hi if hi != points[-1] else True)
            parts.append(sol.y[:, keep])
        A, second, c, w, K = np.concatenate(parts, axis=1)
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
