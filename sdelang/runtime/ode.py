"""The runtime's one call into torchdiffeq, with every evaluation inside the interval.

Both the flow-ODE sampler (T -> eps) and the likelihood (eps -> T) integrate up to an end where the
SDE's coefficients may stop existing just beyond it (g^2 < 0 below t = 0 for VP, beta infinite past
the cosine schedule's end, a pole at t = 1 for an interpolant), and a score network has never seen
times outside [eps, T]. So no evaluation may leave the interval:
- step_t makes the step that would cross the end land on it (the Runge-Kutta stages of a step lie
  between its ends);
- the first step is chosen here, by torchdiffeq's rule (Hairer, Norsett & Wanner, Sec. II.4) with its
  probe step capped at the interval's length: torchdiffeq's own probe evaluates the drift at t0 + h0,
  h0 = 0.01 |y0| / |f0| in the error norm, which for a flow ODE was seen 18 times past T. The drift at
  the start, evaluated for the rule, is handed back to torchdiffeq's first call, so the number of
  evaluations is unchanged.
For a state of several tensors (the likelihood's x and log-density), NORMS says how their step errors
combine into the one number the controller holds below 1; the first-step rule measures in the same
norm. The likelihood's default, "balanced", was chosen by measurement (docs/benchmarks.md, "Step-error
norm").
A step size that underflows means the drift blew up, almost always an untrained or diverging score
model; that is reported as a SolverError saying so, not as torchdiffeq's bare assertion.
"""
from __future__ import annotations

import math

import torch
import torchdiffeq

from ..errors import SolverError
from .config import DEFAULT_NORM

# The adaptive solvers and their orders p: the first-step rule's exponent is 1 / p, one over the embedded error
# estimate's order plus one (Hairer, Norsett & Wanner; torchdiffeq and scipy alike). "rk45" and "rk45_pi" are
# sdelang's own (rk45 below), the others torchdiffeq's.
ORDERS = {"dopri5": 5, "rk45": 5, "rk45_pi": 5, "dopri8": 8, "bosh3": 3, "fehlberg2": 2, "adaptive_heun": 2}
ADAPTIVE_SOLVERS = tuple(ORDERS)   # config.ODE_SOLVERS names them too, for the CLI (a test holds them equal)


def _max_norm(values) -> torch.Tensor:
    """max_k RMS(v_k): the largest per-tensor RMS (torchdiffeq's default for tuple states)."""
    return torch.stack([v.pow(2).mean().sqrt() for v in values]).max()


def _shared_norm(values) -> torch.Tensor:
    """sqrt(sum_k sum(v_k^2) / sum_k numel(v_k)): one RMS over every entry (scipy's solve_ivp on the
    concatenated state)."""
    return (sum(v.pow(2).sum() for v in values) / sum(v.numel() for v in values)).sqrt()


def _balanced_norm(values) -> torch.Tensor:
    """sqrt(mean_k mean(v_k^2)): the RMS of the per-tensor mean squares, each tensor weighted alike
    whatever its size, so no tensor's RMS exceeds sqrt(K) times the norm (K tensors)."""
    return torch.stack([v.pow(2).mean() for v in values]).mean().sqrt()


# The step-error norms, each a function of the state's tensors divided by their tolerances.
NORMS = {"max": _max_norm, "shared": _shared_norm, "balanced": _balanced_norm}


def breakpoints(sde) -> list[float]:
    """eps, the times where the module's coefficients have a kink or a jump (its kink_times(), where it has one:
    an abs or sign of t in the program), and T, in order. A solve over them lands on each: a step across a kink of
    the drift loses the method's order, and an adaptive solver its error control (a logSNR 10 - 20 t - 3 |t - 0.4|
    had log p 7e-3 nats off at rtol = atol = 1e-5, a hundred times the error without the kink)."""
    eps, T = float(sde.eps), float(sde.T)
    inside = getattr(sde, "kink_times", None)
    return [eps, *(k for k in (inside() if callable(inside) else ()) if eps < k < T), T]


def solve_through(func, y0, points, *, rtol: float, atol: float, method: str = "dopri5", norm: str = DEFAULT_NORM,
                  dtype=torch.float64, device=None):
    """The state at points[-1]: solve (below) from points[0] over each segment between consecutive points (breakpoints'
    list, or its reverse), each segment after the first from one unit of `dtype` inside its start, so that no
    evaluation sits on a kink: there sign(0) = 0 gives the coefficient neither side's value, and the step that ends
    on the kink hands its last evaluation (Dormand and Prince's first-same-as-last) to the next as its first; in
    float32, 0.4 rounds to above 0.4. Times as `dtype` on `device` (the state's for the flow sampler, float64 for
    the likelihood)."""
    state = y0
    for i, (a, b) in enumerate(zip(points[:-1], points[1:])):
        times = torch.tensor([a, b], dtype=dtype, device=device)
        if i > 0:
            times[0] = torch.nextafter(times[0], times[1])
        if not times[0] != times[1]:   # a segment under one unit of `dtype`: nothing to solve
            continue
        out = solve(func, state, times, rtol=rtol, atol=atol, method=method, norm=norm)
        state = tuple(o[-1] for o in out) if isinstance(out, tuple) else out[-1]
    return state


def first_step(func, y0, times, *, rtol: float, atol: float, order: int, norm=_max_norm):
    """(h, f0): torchdiffeq's initial step size for func from times[0] towards times[-1], with the probe
    point kept inside the interval and the error measured in `norm` (one of NORMS' values), and
    func(times[0], y0) (evaluated for the rule). `order` is the method's, p in ORDERS."""
    t0, t1 = times[0], times[-1]
    span = (t1 - t0).abs()
    direction = torch.sign(t1 - t0)
    as_tuple = isinstance(y0, tuple)
    ys = y0 if as_tuple else (y0,)
    f0 = func(t0, y0)
    fs = f0 if as_tuple else (f0,)
    scales = [atol + y.abs() * rtol for y in ys]
    d0 = norm([y / s for y, s in zip(ys, scales)])
    d1 = norm([f / s for f, s in zip(fs, scales)])
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    h0 = torch.minimum(h0.to(span.dtype), span)
    y1 = tuple(y + (direction * h0).to(y.dtype) * f for y, f in zip(ys, fs))
    # At the cap, the probe is the end itself (t0 + (t1 - t0) may round past it).
    f1 = func(torch.where(h0 < span, t0 + direction * h0, t1), y1 if as_tuple else y1[0])
    f1s = f1 if as_tuple else (f1,)
    d2 = norm([(a - b) / s for a, b, s in zip(f1s, fs, scales)]) / h0.to(d0.dtype)
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = torch.clamp(h0 * 1e-3, min=1e-6)
    else:
        h1 = (0.01 / torch.maximum(d1, d2)) ** (1.0 / order)
    return torch.minimum(100 * h0, h1.to(h0.dtype)), f0


def solve(func, y0, times, *, rtol: float, atol: float, method: str = "dopri5", norm: str = DEFAULT_NORM):
    """torchdiffeq.odeint(func, y0, times) with every evaluation of func in [min(times), max(times)] and
    the last time stepped onto exactly; methods "rk45" and "rk45_pi" run rk45 below instead of torchdiffeq,
    with the same first step. For a tuple state y0, `norm` (a key of NORMS) combines the
    tensors' step errors, each divided by atol + rtol |y|, into the one number held below 1; for a
    single tensor all three are its RMS."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    norm_fn = NORMS[norm]
    h, f0 = first_step(func, y0, times, rtol=rtol, atol=atol, order=ORDERS[method], norm=norm_fn)
    pending, last = [f0], [f0]

    def once_cached(t, y):
        # torchdiffeq's first call is func(times[0], y0), which first_step has just evaluated.
        last[0] = pending.pop() if pending else func(t, y)
        return last[0]
    try:
        if method in ("rk45", "rk45_pi"):
            return rk45(once_cached, y0, times, pending.pop(), h, rtol=rtol, atol=atol, norm=norm_fn,
                        control="scipy" if method == "rk45" else "pi")
        return torchdiffeq.odeint(once_cached, y0, times, rtol=rtol, atol=atol, method=method,
                                  options={"step_t": times[1:], "first_step": h,
                                           # torchdiffeq hands a tuple state's norm the tuple, a tensor's the tensor.
                                           "norm": norm_fn if isinstance(y0, tuple) else lambda v: norm_fn((v,))})
    except AssertionError as exc:
        # A non-finite drift makes the step's error NaN, which every norm here propagates: the step is refused
        # and torchdiffeq reports the step size underflowing instead (its own norm, a Python max over the
        # tensors, could skip the NaN and accept a non-finite state).
        drift = last[0] if isinstance(last[0], tuple) else (last[0],)
        if "non-finite" in str(exc) or not all(bool(torch.isfinite(f).all()) for f in drift):
            # torchdiffeq's message carries the whole state tensor: the first line is what it says.
            raise SolverError(f"the {method} solver met a non-finite value between t = {float(times[0]):g} and "
                              f"t = {float(times[-1]):g}: the flow drift or its divergence is inf or NaN at a state "
                              f"the solve reached (a score model that is not trained enough or diverges, or "
                              f"coefficients that overflow there)") from None
        if "underflow" not in str(exc):
            raise
        raise SolverError(f"the {method} solver's step size underflowed between t = {float(times[0]):g} and "
                          f"t = {float(times[-1]):g} ({exc}): the flow drift is too stiff, usually a score "
                          f"model that is not trained enough or diverges; try a fixed-step method (heun, "
                          f"dpm2) or a looser tolerance") from exc


# Dormand and Prince's 5(4) pair: the stages' times and coefficients, the fifth-order weights, and the weights of
# the error estimate (fifth- minus fourth-order solution, the seventh stage being f at the new point).
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_A = ((),
      (1 / 5,),
      (3 / 40, 9 / 40),
      (44 / 45, -56 / 15, 32 / 9),
      (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
      (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656))
_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_E = (-71 / 57600, 0.0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40)
# The step-size controller: a step's next size is h SAFETY / err^(1/5), by at most MAX_FACTOR up and MIN_FACTOR
# down, and never up on the step after a rejected one.
SAFETY, MIN_FACTOR, MAX_FACTOR = 0.9, 0.2, 10.0
# rk45_pi's proportional-integral control (Hairer & Wanner, Solving ODEs II, IV.2; Hairer's DOPRI5 code): the
# next h is h SAFETY err^(-(1/5 - 3 PI_BETA / 4)) err_previous^PI_BETA, with DOPRI5's default PI_BETA.
PI_BETA = 0.04


def rk45(func, y0, times, f0, h, *, rtol: float, atol: float, norm=_max_norm, control: str = "scipy"):
    """The solution at each of `times` (stacked like torchdiffeq's odeint) by the Dormand-Prince 5(4) pair with
    scipy RK45's error estimate (the norm of the fifth- minus fourth-order solution divided by atol + rtol
    max(|y|, |y_new|): err) and one of two step controls:
    - control="scipy" (method "rk45"), scipy's RK45, which score_sde's likelihood uses: an accepted step sets
      the next h to h min(10, 0.9 err^(-1/5)), so a step near the tolerance shrinks the next one; a rejected
      step shrinks h by max(0.2, 0.9 err^(-1/5));
    - control="pi" (method "rk45_pi"): the exponent of err is 1/5 - 3 PI_BETA / 4 and the previous accepted
      step's err enters as err_previous^PI_BETA, which damps the step size's oscillation between
      nearly-rejected and over-cautious steps (the same bounds 0.2 and 10).
    With both, after a rejection the next accepted step does not grow h. (torchdiffeq's dopri5 never shrinks h
    after an accepted step, and has another error estimate.) Every stage lies inside the current step, and
    each time in `times` is landed on exactly. f0 = func(times[0], y0) and h the first step (first_step gives
    both); 6 evaluations per step, the last reused by the next step. Times are kept as Python floats (float64,
    as torchdiffeq keeps them); the one synchronisation per step is the step's error, which decides the next."""
    exponent = 0.2 if control == "scipy" else 0.2 - 0.75 * PI_BETA
    beta = 0.0 if control == "scipy" else PI_BETA
    as_tuple = isinstance(y0, tuple)
    ys = y0 if as_tuple else (y0,)
    fs = f0 if as_tuple else (f0,)

    def call(t, state):
        out = func(t, state if as_tuple else state[0])
        return out if as_tuple else (out,)

    def combine(base, weights, k, dt):
        return tuple(y + dt * sum(w * kk[j] for w, kk in zip(weights, k) if w) for j, y in enumerate(base))

    points = [float(u) for u in times]
    t, h = points[0], abs(float(h))
    direction = 1.0 if points[-1] >= points[0] else -1.0
    out = [ys]
    previous = 1e-4   # err of the last accepted step, for the PI control (DOPRI5's start)
    for end in points[1:]:
        rejected = False
        while (end - t) * direction > 0:
            remaining = abs(end - t)
            last = h >= remaining
            step = remaining if last else h
            # Ten units of float64 at t: below that a step no longer moves t (scipy's bound too).
            if step < 10 * abs(math.nextafter(t, direction * math.inf) - t):
                raise AssertionError("underflow in dt")
            signed = direction * step
            t_new = end if last else t + signed
            # The stages' times in one copy to the device per step, made where the stream has just drained (the
            # step's error was read): a copy per evaluation would wait for the previous stage's kernels each time.
            stage_times = torch.tensor([t + c * signed for c in _C[1:]] + [t_new], dtype=torch.float64,
                                       device=times.device)
            k = [fs]
            for i in range(1, 6):
                k.append(call(stage_times[i - 1], combine(ys, _A[i], k, signed)))
            new = combine(ys, _B, k, signed)
            f_new = call(stage_times[5], new)
            k.append(f_new)
            errors = tuple(signed * sum(e * kk[j] for e, kk in zip(_E, k) if e) /
                           (atol + rtol * torch.maximum(y.abs(), y_new.abs()))
                           for j, (y, y_new) in enumerate(zip(ys, new)))
            err = float(norm(errors))
            if not math.isfinite(err):
                raise AssertionError("non-finite step error")
            if err < 1:
                factor = MAX_FACTOR if err == 0 else min(MAX_FACTOR, max(MIN_FACTOR, SAFETY * err ** -exponent
                                                                        * previous ** beta))
                if rejected:
                    factor = min(1.0, factor)
                h = step * factor
                previous = max(err, 1e-4)
                t, ys, fs, rejected = t_new, new, f_new, False
            else:
                h = step * max(MIN_FACTOR, SAFETY * err ** -exponent)
                rejected = True
        out.append(ys)
    stacked = tuple(torch.stack([o[j] for o in out]) for j in range(len(ys)))
    return stacked if as_tuple else stacked[0]
