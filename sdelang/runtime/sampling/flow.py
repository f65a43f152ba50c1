"""Samplers of the probability-flow ODE dx/dt = f - g^2 s / 2: torchdiffeq's adaptive solvers and Heun."""
from __future__ import annotations

import torch

from ..kinds import kind_of
from ..ode import ADAPTIVE_SOLVERS, breakpoints, solve_through
from .common import Counted, Samples, check_choice, check_positive, fixed_step, require_kernel, run, start, tweedie


def probability_flow(sde, score_fn, shape, *, rtol=1e-5, atol=1e-5, solver="dopri5", generator=None,
                     denoise=True, x_T=None) -> Samples:
    """The flow ODE dx/dt = f - g^2 s / 2 from T to eps with torchdiffeq's adaptive `solver` (one of
    ADAPTIVE_SOLVERS), through the module's flow drift (for general SDEs f - d(g^2)/dx / 2 - g^2 s / 2).
    NFE: the solver's evaluations of the drift (+1 with denoise, affine SDEs only)."""
    check_choice("ODE solver", solver, ADAPTIVE_SOLVERS)
    check_positive("rtol", rtol)
    check_positive("atol", atol)
    denoise = denoise and kind_of(sde) == "affine"
    if denoise:
        require_kernel(sde, "the Tweedie denoising step")
    x = start(sde, shape, generator, x_T)
    score = Counted(score_fn)
    flow = sde.reverse(score, probability_flow=True)
    batch = x.shape[:1]
    # The drift is evaluated in x's dtype; ode.solve never steps past eps (below it, VP's g^2 < 0). Kinks of the
    # coefficients, if any, are segment ends on the way.
    x = solve_through(lambda t, y: flow.sde(y, t.to(y.dtype).expand(batch))[0], x, breakpoints(sde)[::-1], rtol=rtol,
                      atol=atol, method=solver, dtype=x.dtype, device=x.device)
    if denoise:
        x = tweedie(sde, score, x)
    return Samples(x, score.calls)


def heun(sde, score_fn, shape, steps, *, spacing="time", generator=None, denoise=True, progress=False,
         x_T=None, after_step=None) -> Samples:
    """Heun's method on the flow ODE, d = f - g^2 s / 2: x_e = x + h d(x, t),
    x <- x + h (d(x, t) + d(x_e, t_next)) / 2, h = t_next - t; the last step is Euler (x_e), which
    keeps the global order 2. NFE: 2 steps - 1 (+1)."""
    steps, score, x, grid, denoise = fixed_step(sde, score_fn, shape, steps, generator, x_T, what="heun",
                                                 kernel=False, denoise=denoise, spacing=spacing)
    flow = sde.reverse(score, probability_flow=True)

    def step(x, i, t, t_next):
        h = sde._expand(t_next - t, x)
        d = flow.sde(x, t)[0]
        euler = x + h * d
        if i == steps - 1:
            return euler
        return x + h * (d + flow.sde(euler, t_next)[0]) / 2
    return run(sde, score, x, grid.to(x.dtype), step, denoise=denoise, progress=progress,
                after_step=after_step, desc="heun")

