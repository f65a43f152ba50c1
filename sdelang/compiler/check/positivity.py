"""Positivity and finiteness: the diffusion, the weighting and the drift on [eps, T] (and on states)."""
from __future__ import annotations

import numpy as np
import sympy as sp

from .common import EVALUATE_SECONDS, GRID_POINTS, STATE_RANGE, TIME, call_with_time_limit
from .sign import decide
from ..derive.symbolic import numpy_function

DECIDE_SECONDS = 5.0  # for the exact sign of one coefficient; beyond it the check samples (and says so)


def _exact_number(value: float) -> sp.Rational:
    """A float bound of [eps, T] as the decimal it prints as (1e-05 -> 1/100000)."""
    return sp.Rational(repr(float(value)))


def pole_hint(eps: float, pole: float) -> str:
    """Where a coefficient is infinite: the interval must end before it (0.999 for a pole at 1)."""
    before = float(f"{pole - max(pole * 1e-3, eps):.3g}")
    return f"the interval must stop before the pole, e.g. 't in [{eps:g}, {before:g}]'"


class PositivityPass:
    """Refuses a diffusion or weighting that is not positive, a drift that is not finite."""

    def _check_sde(self, drift, diffusion, x, drift_span, diffusion_span, eps, T) -> bool:
        """Refuse a diffusion that vanishes or a drift that is not finite; return whether the SDE is affine."""
        slope = sp.diff(drift, x)
        affine = not slope.has(x)
        if not affine:
            # Only a slope that simplifies to a function of t is affine; out of time counts as general.
            done, simple = call_with_time_limit(EVALUATE_SECONDS, sp.simplify, slope)
            affine = done and not simple.has(x)
        if diffusion == 0:
            raise self.error("the diffusion is zero: an SDE without noise is not supported", diffusion_span,
                             "give a positive g(t) before 'dw', e.g. 'sqrt(2) dw'")
        if diffusion.has(x):
            self._check_on_states(diffusion**2, x, diffusion_span, eps, T, "the diffusion", positive=True)
            affine = False
        else:
            self._check_positive(diffusion, diffusion_span, eps, T, "the diffusion",
                                 "g(t) must be positive on [eps, T]; write it as a square root, e.g. sqrt(beta(t))")
        if not affine:
            # Poles in t first, exactly, at two states (a pole of -x^3 / (t - 0.5) vanishes at x = 0 alone).
            for state in (sp.Integer(1), sp.Rational(1, 3)):
                self._check_no_pole(drift.subs(x, state), drift_span, eps, T, "the drift")
            if diffusion.has(x):
                self._check_no_pole(diffusion.subs(x, 1), diffusion_span, eps, T, "the diffusion")
            self._check_on_states(drift, x, drift_span, eps, T, "the drift", positive=False)
            return False
        for part in (slope, drift.subs(x, 0)):
            self._check_no_pole(part, drift_span, eps, T, "the drift")
            values = self._on_grid(part, eps, T)
            if not np.all(np.isfinite(values)):
                i = np.flatnonzero(~np.isfinite(values))[0]
                bad = self._grid(eps, T)[i]
                if np.isinf(values[i]) and self._finite_beyond_float64(part, bad):
                    raise self.error(f"the drift overflows float64 at t = {bad:.6g}{self.at_defaults()}: it is finite "
                                     "there, but it or a part of it is beyond 1.8e308", drift_span,
                                     "choose parameters or an interval [eps, T] that keep the coefficients within "
                                     "float64's range")
                raise self.error(f"the drift is not finite at t = {bad:.6g}", drift_span,
                                 pole_hint(eps, bad) if np.isinf(values[i]) else
                                 "choose [eps, T] inside the drift's domain")
        return True

    def _finite_beyond_float64(self, expr: sp.Expr, at: float) -> bool:
        """expr (at the defaults), which float64 evaluates as inf at t = at, is a finite real number there: an
        overflow, of the value or of a part (e^(1000 t) / 10 at t = 0.71), not a pole."""
        done, value = call_with_time_limit(EVALUATE_SECONDS, lambda: self._exact(expr).subs(TIME, _exact_number(at))
                                           .evalf(20))
        return bool(done and value.is_number and value.is_real and value.is_finite)

    def _check_no_pole(self, expr, span, eps, T, what) -> None:
        """expr(t) finite and real on [eps, T], decided from its poles where SymPy lists them in time (a pole
        between the grid's points, -x / (t - 0.5) on [1e-5, 0.9], compiled into a module that was inf and then
        of the wrong sign past it); undecided, the grid check that follows stands."""
        if not expr.has(TIME):
            return
        decided, failure = self._decide(expr, eps, T)
        if decided and failure is not None and failure.what in ("infinite", "not real"):
            self._refuse_singular(failure, what, span, eps, T,
                                  "the coefficients must be finite on [eps, T]: move the pole outside the interval"
                                  if failure.what == "infinite" else "choose [eps, T] inside the drift's domain")

    def _decide(self, expr, eps, T):
        """check/sign.py's decision on expr(t) over [eps, T] at the defaults: (True, failure or None), or
        (False, None) where SymPy does not list its roots and poles in time."""
        done, answer = call_with_time_limit(DECIDE_SECONDS, decide, self._exact(expr), TIME, _exact_number(eps),
                                            _exact_number(T))
        return answer if done else (False, None)

    def _refuse_singular(self, failure, what, span, eps, T, hint) -> None:
        """Raise for a pole or a value that is not real, found exactly; a pole near T is answered with where the
        interval must stop (an interval that stops before the pole helps only for a pole at its end)."""
        at = f"t = {failure.t:.6g}"
        if failure.what == "infinite":
            near_T = failure.t >= T - 0.01 * (T - eps)
            raise self.error(f"{what} has a pole at {at}" + self.at_defaults(), span,
                             pole_hint(eps, failure.t) if near_T else hint)
        raise self.error(f"{what} is not a real number at {at} (a square root or logarithm of a negative number)"
                         + self.at_defaults(), span, hint)

    def _check_on_states(self, expr, x, span, eps, T, what, positive) -> None:
        """expr(x, t) finite (and positive) on a grid of x in [-STATE_RANGE, STATE_RANGE] and t in [eps, T].

        A positive expr is first decided exactly in x (check/sign.py) at a few times, which finds a zero at
        x = 0.3 or sqrt(2) that the grid steps over; in t it stays sampled, and the program says so."""
        if positive:
            self._check_states_exactly(expr, x, span, eps, T, what)
        fn = numpy_function((x, TIME), self.with_defaults(expr))
        xs, ts = np.meshgrid(np.linspace(-STATE_RANGE, STATE_RANGE, 41), self._grid(eps, T))
        with np.errstate(all="ignore"):
            values = np.asarray(fn(xs, ts), dtype=complex) * np.ones(xs.shape)
        bad = ~np.isfinite(values) | (np.abs(values.imag) > 1e-12 * (1 + np.abs(values.real)))
        if positive:
            bad |= values.real <= 0
        if bad.any():
            i = np.flatnonzero(bad.ravel())[0]
            problem = "zero" if positive and np.isfinite(values.ravel()[i]) and values.ravel()[i].real == 0 else (
                "not positive" if positive and np.isfinite(values.ravel()[i]) else "not a finite real number")
            raise self.error(f"{what} is {problem} at {x} = {xs.ravel()[i]:.6g}, t = {ts.ravel()[i]:.6g}", span,
                             f"sdelang checks {x} in [-{STATE_RANGE:g}, {STATE_RANGE:g}]; "
                             + ("the noise must not vanish, e.g. sqrt(1 + x^2)" if positive else
                                "choose a drift defined for every state"))

    def _check_states_exactly(self, expr, x, span, eps, T, what) -> None:
        exact = self._exact(expr)
        bound = sp.Integer(int(STATE_RANGE))
        for time in sorted({_exact_number(eps), _exact_number((eps + T) / 2), _exact_number(T)}):
            done, answer = call_with_time_limit(DECIDE_SECONDS, decide, exact.subs(TIME, time), x, -bound, bound)
            if done and answer[0] and answer[1] is not None:
                failure = answer[1]
                word = {"infinite": "not finite", "not real": "not a real number"}.get(failure.what, failure.what)
                if failure.what == "negative" and expr.is_Pow and expr.exp == 2:
                    word = "not a real number"
                raise self.error(f"{what} is {word} at {x} = {failure.t:.6g}, t = {float(time):.6g}"
                                 + self.at_defaults(), span,
                                 f"sdelang checks {x} in [-{STATE_RANGE:g}, {STATE_RANGE:g}]; "
                                 "the noise must not vanish, e.g. sqrt(1 + x^2)")
        self.sampled.append(f"{what} was checked exactly in {x} at {len({eps, (eps + T) / 2, T})} times and on a "
                            f"grid of {GRID_POINTS} times in [eps, T]")

    def _grid(self, eps: float, T: float) -> np.ndarray:
        return np.linspace(eps, T, GRID_POINTS)

    def _on_grid(self, expr: sp.Expr, eps: float, T: float) -> np.ndarray:
        expr = self.with_defaults(expr)
        fn = numpy_function(TIME, expr)
        with np.errstate(all="ignore"):
            values = np.asarray(fn(self._grid(eps, T)), dtype=complex) * np.ones(GRID_POINTS)
        real = values.real.copy()
        real[np.abs(values.imag) > 1e-12 * (1 + np.abs(values.real))] = np.nan
        return real

    def _exact(self, expr: sp.Expr) -> sp.Expr:
        """expr at the parameters' defaults, with every float written as the exact decimal it came from."""
        return sp.nsimplify(self.with_defaults(expr), rational=True)

    def _check_positive(self, expr, span, eps, T, what, hint) -> None:
        """expr(t) > 0 on [eps, T]: proved from its real roots and poles (check/sign.py) where SymPy lists them
        in time, else checked on a grid and recorded as sampled."""
        decided, failure = self._decide(expr, eps, T)
        if decided:
            if failure is None:
                return
            if failure.what in ("infinite", "not real"):
                self._refuse_singular(failure, what, span, eps, T, hint)
            at = f"t = {failure.t:.6g}"
            if failure.what == "negative" and failure.piece is not None:
                a, b = failure.piece
                message = f"{what} is negative for t between {a:.6g} and {b:.6g} (e.g. at {at})"
            else:
                message = f"{what} is {failure.what} at {at}"
                if failure.what == "below 1e-25":
                    hint = "values this small vanish in float32 arithmetic" + (
                        "; scale the weighting up: only its shape over t changes the optimum" if "weighting" in what
                        else "")
            raise self.error(message + self.at_defaults(), span, hint)
        self.sampled.append(f"{what} was checked positive at {GRID_POINTS} times in [eps, T] only: SymPy could not "
                            f"list its roots and poles")
        values = self._on_grid(expr, eps, T)
        grid = self._grid(eps, T)
        if not np.all(np.isfinite(values)):
            i = np.flatnonzero(~np.isfinite(values))[0]
            if np.isinf(values[i]):
                # Sampled, so a pole cannot be told from a value past float64's range (a product of 2^30
                # factors) at this point: say both.
                near_T = grid[i] >= T - 0.01 * (T - eps)
                raise self.error(f"{what} is infinite at t = {grid[i]:.6g} in float64 (a pole, or a value beyond "
                                 f"1.8e308)", span, pole_hint(eps, grid[i]) if near_T else hint)
            if expr.is_Pow and expr.exp == sp.Rational(1, 2):
                under = self._on_grid(expr.base, eps, T)[i]
                if np.isfinite(under) and under < 0:
                    raise self.error(f"{what} is the square root of a negative number at t = {grid[i]:.6g} (its square "
                                     f"is {under:.3g}){self.at_defaults()}", span,
                                     "the expression under sqrt must be positive on [eps, T]")
            raise self.error(f"{what} is not a finite real number at t = {grid[i]:.6g}", span, hint)
        if np.any(values <= 0):
            first = np.flatnonzero(values <= 0)[0]
            word = "negative" if values[first] < 0 else "zero"
            where = " (with the default parameters)" if self.params else ""
            raise self.error(f"{what} is {word} at t = {grid[first]:.6g}{where}", span, hint)
