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
