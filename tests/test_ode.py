"""The runtime's ODE entry point: it lands on the end time and reports a blown-up drift clearly."""
from __future__ import annotations

import pytest
import torch

from sdelang.cli import main
from sdelang.errors import SolverError
from sdelang.runtime.likelihood import log_likelihood
from sdelang.runtime.ode import solve
from sdelang.runtime.sampling import probability_flow


def test_solve_never_evaluates_past_the_end():
    seen = []

    def decay(t, y):
        seen.append(float(t))
        return -y

    times = torch.tensor([0.0, 1.0], dtype=torch.float64)
    y = solve(decay, torch.ones(3, dtype=torch.float64), times, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(y[-1], torch.full((3,), torch.exp(torch.tensor(-1.0)).item(), dtype=torch.float64))
    assert max(seen) <= 1.0


def exploding(sign):
    """A score whose flow drift runs away in finite time along the direction of integration (T -> eps
    for sampling, eps -> T for the likelihood): the solver's step size must underflow."""
    return lambda x, t: sign * 1e6 * x**3


@pytest.mark.parametrize("run", ["sample", "likelihood"])
def test_a_diverging_score_raises_solver_error(examples, run):
    sde = examples["vp"].build()
    with pytest.raises(SolverError, match="not trained enough or diverges"):
        if run == "sample":
            probability_flow(sde, exploding(+1), (4, 2), generator=torch.Generator().manual_seed(0))
        else:
            log_likelihood(sde, exploding(-1), torch.full((4, 2), 3.0, dtype=torch.float64), exact_trace=True)


def test_cli_reports_solver_errors_without_traceback(monkeypatch, capsys):
    """Exit status 1 (the run failed; not a usage mistake, not a bug) and the message alone."""
    import sdelang.cli.commands

    def fail(args):
        raise SolverError("the dopri5 solver's step size underflowed")

    monkeypatch.setattr(sdelang.cli.commands, "_sample", fail)
    assert main(["sample", "somewhere"]) == 1
    err = capsys.readouterr().err
    assert err == "sdelang sample: the dopri5 solver's step size underflowed\n"


class OutsideTheInterval(Exception):
    pass


def guarded(sde, seen):
    """The module with its coefficients NaN outside [eps, T] (as where they stop existing, a pole at T or
    g^2 < 0 below 0), every time it is asked about recorded in `seen`."""
    eps, T = float(sde.eps), float(sde.T)

    def nan_outside(method):
        def wrapped(*args):
            t = args[-1]
            seen.append(t.detach().double().flatten())
            out = method(*args)
            outside = (t < eps) | (t > T)
            if isinstance(out, tuple):
                return tuple(torch.where(sde._expand(outside, o), torch.nan, o) for o in out)
            return torch.where(sde._expand(outside, out) if out.dim() > 1 else outside, torch.nan, out)
        return wrapped
    for name in ("sde", "mean_coeff", "mean_offset", "std", "log_snr", "drift_divergence", "diffusion"):
        setattr(sde, name, nan_outside(getattr(sde, name)))
    return sde


def recording(score, seen):
    def wrapped(x, t):
        seen.append(t.detach().double().flatten())
        return score(x, t)
    return wrapped


@pytest.mark.parametrize("name, mean, std", [("ve", 0.0, 1.0), ("subvp", 0.0, 1.0), ("cosine_vp", 0.5, 0.4),
                                             ("edm_ve", 0.5, 0.4)])
def test_ode_solves_never_leave_eps_T(examples, name, mean, std):
    """The likelihood and the flow sampler call the score and the module only at t in [eps, T]; with the
    coefficients NaN outside, their results equal those of the unguarded module. With torchdiffeq's own
    first-step probe, data N(0, I) took the likelihood on ve to t = 2.6 (T = 1) and the sampler on subvp
    to t = -22."""
    from sdelang.runtime.gaussian import GaussianData
    from sdelang.runtime.sampling import sample

    sde = examples[name].build(dtype=torch.float64)
    eps, T = float(sde.eps), float(sde.T)
    data = GaussianData(sde, torch.tensor([mean, -mean]), std, (2,))
    x = data.sample(16, generator=torch.Generator().manual_seed(0))
    plain = log_likelihood(sde, data.score, x, exact_trace=True)
    seen = []
    gsde = guarded(examples[name].build(dtype=torch.float64), seen)
    gdata = GaussianData(gsde, torch.tensor([mean, -mean]), std, (2,))
    out = log_likelihood(gsde, recording(gdata.score, seen), x, exact_trace=True)
    torch.testing.assert_close(out.logp, plain.logp)
    assert out.nfe == plain.nfe
    flows = [sample(s, recording(d.score, seen), (16, 2), "ode", generator=torch.Generator().manual_seed(1))
             for s, d in ((sde, data), (gsde, gdata))]
    torch.testing.assert_close(flows[0].x, flows[1].x)
    times = torch.cat(seen)
    assert times.numel() > 0
    assert float(times.min()) >= eps and float(times.max()) <= T, (float(times.min()), float(times.max()))


@pytest.mark.parametrize("method", ["dopri5", "rk45"])
def test_a_non_finite_drift_is_a_solver_error(method):
    """A drift that turns NaN mid-solve (a state where coefficients overflow) is a SolverError naming the interval,
    not torchdiffeq's assertion with the whole state tensor in it (an internal error, exit 3, from `sdelang nll`)."""
    def poisoned(t, state):   # (x, divergence integral), as the likelihood solves: the divergence turns inf
        x, _ = state
        return -x, torch.where(t > 0.3, torch.full_like(x[:, 0], float("inf")), -x[:, 0])

    state = (torch.ones(3, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(SolverError, match="met a non-finite value between t = 0 and t = 1") as info:
        solve(poisoned, state, torch.tensor([0.0, 1.0], dtype=torch.float64), rtol=1e-6, atol=1e-6, method=method)
    assert "tensor(" not in str(info.value)


def test_norms_compute_what_they_say():
    """Two tensors of different sizes: a = (1, 2, 3, 4) (mean square 7.5, RMS sqrt 7.5) and b = (6)."""
    from sdelang.runtime.config import ODE_NORMS
    from sdelang.runtime.ode import NORMS

    a, b = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64), torch.tensor([6.0], dtype=torch.float64)
    expected = {"max": 6.0,                              # max(sqrt 7.5, 6)
                "shared": ((30 + 36) / 5) ** 0.5,        # one RMS over the 5 entries
                "balanced": ((7.5 + 36) / 2) ** 0.5}     # RMS of the two mean squares
    assert set(NORMS) == set(expected) == set(ODE_NORMS)
    for name, value in expected.items():
        assert float(NORMS[name]((a, b))) == pytest.approx(value, rel=1e-14), name
        assert float(NORMS[name]((a,))) == pytest.approx(7.5**0.5, rel=1e-14), name   # one tensor: its RMS


def elementwise(t, y):
    """A nonlinear, time-dependent drift acting entry by entry, so a split state solves as the whole."""
    return -y * (1 + torch.cos(6 * t) * y) + torch.sin(3 * t)


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "rk45"])
def test_shared_norm_solves_a_split_state_as_one_tensor(method):
    """Under "shared" the pair (y[:40], y[40:]) takes the steps, first step included, of y itself (whose norm is
    its RMS); under "max" the 2-entry tensor, whose error is not averaged with the 40 others, takes more."""
    y0 = torch.linspace(-1.0, 2.0, 42, dtype=torch.float64) ** 3
    times = torch.tensor([0.0, 2.0], dtype=torch.float64)
    calls = {}

    def counted(key):
        def func(t, y):
            calls[key] = calls.get(key, 0) + 1
            return tuple(elementwise(t, part) for part in y) if isinstance(y, tuple) else elementwise(t, y)
        return func
    whole = solve(counted("whole"), y0, times, rtol=1e-6, atol=1e-6, method=method)
    split = solve(counted("shared"), (y0[:40], y0[40:]), times, rtol=1e-6, atol=1e-6, method=method, norm="shared")
    torch.testing.assert_close(torch.cat(split, 1), whole, rtol=1e-13, atol=1e-13)
    assert calls["shared"] == calls["whole"]
    solve(counted("max"), (y0[:40], y0[40:]), times, rtol=1e-6, atol=1e-6, method=method, norm="max")
    assert calls["max"] > calls["shared"]


@pytest.mark.parametrize("method", ["dopri5", "dopri8", "bosh3"])
def test_solve_is_torchdiffeq_where_its_first_step_probe_stays_inside(method):
    """Where torchdiffeq's own first-step probe stays in the interval, solve takes its steps exactly: the same
    first step (Hairer, Norsett & Wanner II.4, h1 = (0.01 / max(d1, d2))^(1/p), p the method's order), the
    same evaluations and the same result."""
    import torchdiffeq

    y0 = torch.linspace(0.5, 3.0, 7, dtype=torch.float64)
    times = torch.tensor([0.0, 2.0], dtype=torch.float64)
    seen = {"ours": [], "theirs": []}

    def recorded(key):
        def func(t, y):
            seen[key].append(float(t))
            return elementwise(t, y)
        return func
    ours = solve(recorded("ours"), y0, times, rtol=1e-6, atol=1e-6, method=method, norm="max")
    theirs = torchdiffeq.odeint(recorded("theirs"), y0, times, rtol=1e-6, atol=1e-6, method=method,
                                options={"step_t": times[1:]})
    assert max(seen["theirs"]) <= 2.0
    assert seen["ours"] == seen["theirs"]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_solve_rejects_an_unknown_norm():
    with pytest.raises(ValueError, match="norm must be one of max, shared, balanced"):
        solve(elementwise, torch.ones(2, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64),
              rtol=1e-5, atol=1e-5, norm="l2")


def coupled(t, y):
    """A nonlinear drift that mixes entries (a small tanh network), so the step control sees every entry at once."""
    weights = torch.linspace(-1.0, 1.0, y.numel() ** 2, dtype=y.dtype).reshape(y.numel(), y.numel()).sin() * 1.5
    return torch.tanh(weights @ y) * torch.cos(3 * t) - 0.5 * y * t


@pytest.mark.parametrize("drift", [elementwise, coupled])
@pytest.mark.parametrize("tol", [1e-3, 1e-6, 1e-9])
@pytest.mark.parametrize("backward", [False, True])
def test_rk45_takes_scipys_steps(drift, tol, backward):
    """sdelang's rk45 is scipy's RK45 (Dormand-Prince 5(4), scipy's step control and first step) on torch tensors:
    the same number of evaluations as solve_ivp(method="RK45") and the same solution to rounding (1e-11), forwards
    and backwards in time, each evaluation inside the interval. score_sde's likelihood solves with scipy's RK45."""
    from scipy.integrate import solve_ivp

    y0 = torch.linspace(-1.0, 1.5, 6, dtype=torch.float64)
    span = (2.0, 1e-3) if backward else (1e-3, 2.0)
    theirs = solve_ivp(lambda t, y: drift(torch.tensor(t, dtype=torch.float64), torch.tensor(y)).numpy(), span,
                       y0.numpy(), method="RK45", rtol=tol, atol=tol)
    seen = []

    def recorded(t, y):
        seen.append(float(t))
        return drift(t, y)
    ours = solve(recorded, y0, torch.tensor(span, dtype=torch.float64), rtol=tol, atol=tol, method="rk45")
    assert len(seen) == theirs.nfev
    torch.testing.assert_close(ours[-1], torch.tensor(theirs.y[:, -1]), rtol=1e-11, atol=1e-11)
    assert min(span) <= min(seen) and max(seen) <= max(span)


def test_the_cli_names_every_solver():
    from sdelang.runtime.config import ODE_SOLVERS
    from sdelang.runtime.ode import ADAPTIVE_SOLVERS
    assert ODE_SOLVERS == ADAPTIVE_SOLVERS


@pytest.mark.parametrize("drift", [elementwise, coupled])
@pytest.mark.parametrize("tol", [1e-4, 1e-6, 1e-8])
def test_rk45_pi_holds_its_tolerance(drift, tol):
    """rk45_pi (the same pair, Hairer's PI step control) against scipy's DOP853 at 1e-13: the global error stays
    within a few times the tolerance (bound 20 tol, relative to 1 + |y|; a controller that let the error grow
    with the number of steps, or a wrong exponent, fails it), and every evaluation lies inside the interval."""
    from scipy.integrate import solve_ivp

    y0 = torch.linspace(-1.0, 1.5, 6, dtype=torch.float64)
    span = (1e-3, 2.0)
    reference = solve_ivp(lambda t, y: drift(torch.tensor(t, dtype=torch.float64), torch.tensor(y)).numpy(), span,
                          y0.numpy(), method="DOP853", rtol=1e-13, atol=1e-13).y[:, -1]
    seen = []

    def recorded(t, y):
        seen.append(float(t))
        return drift(t, y)
    ours = solve(recorded, y0, torch.tensor(span, dtype=torch.float64), rtol=tol, atol=tol, method="rk45_pi")
    error = ((ours[-1].numpy() - reference) / (1 + abs(reference))).max()
    assert abs(error) <= 20 * tol
    assert min(span) <= min(seen) and max(seen) <= max(span)


def test_rk45_pi_without_its_integral_term_is_scipys(monkeypatch):
    """With PI_BETA = 0 the PI control reduces to scipy's (exponent 1/5, no memory of the previous error): the
    same evaluations as solve_ivp's RK45, which ties rk45_pi's controller to the published one term by term."""
    from scipy.integrate import solve_ivp

    import sdelang.runtime.ode as ode
    monkeypatch.setattr(ode, "PI_BETA", 0.0)
    y0 = torch.linspace(-1.0, 1.5, 6, dtype=torch.float64)
    for tol in (1e-3, 1e-6):
        theirs = solve_ivp(lambda t, y: coupled(torch.tensor(t, dtype=torch.float64), torch.tensor(y)).numpy(),
                           (1e-3, 2.0), y0.numpy(), method="RK45", rtol=tol, atol=tol)
        calls = []
        solve(lambda t, y: calls.append(1) or coupled(t, y), y0, torch.tensor([1e-3, 2.0], dtype=torch.float64),
              rtol=tol, atol=tol, method="rk45_pi")
        assert len(calls) == theirs.nfev
