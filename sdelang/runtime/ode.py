"""The runtime's one call into torchdiffeq, with the end of the interval stepped onto exactly.

Both the flow-ODE sampler (T -> eps) and the likelihood (eps -> T) integrate up to an end where the
SDE's coefficients may stop existing just beyond it (g^2 < 0 below t = 0 for VP, beta infinite past
the cosine schedule's end), so the solver must never step over it: step_t makes the step that would
cross the end land on it. A step size that underflows means the drift blew up, almost always an
untrained or diverging score model; that is reported as a SolverError saying so, not as
torchdiffeq's bare assertion.
"""
from __future__ import annotations

import torchdiffeq

from ..errors import SolverError

# torchdiffeq's adaptive solvers.
ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


def solve(func, y0, times, *, rtol: float, atol: float, method: str = "dopri5"):
    """torchdiffeq.odeint(func, y0, times) with the last time stepped onto exactly."""
    try:
        return torchdiffeq.odeint(func, y0, times, rtol=rtol, atol=atol, method=method,
                                  options={"step_t": times[1:]})
    except AssertionError as exc:
        if "underflow" not in str(exc):
            raise
        raise SolverError(f"the {method} solver's step size underflowed between t = {float(times[0]):g} and "
                          f"t = {float(times[-1]):g} ({exc}): the flow drift is too stiff, usually a score "
                          f"model that is not trained enough or diverges; try a fixed-step method (heun, "
                          f"dpm2) or a looser tolerance") from exc
