"""The coupled SDEs' exponential integrator (sampling/coupled.py: coupled_exponential) against scipy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdelang.runtime import sampling
from test_kinds_sampling import F64, SCHEDULE, components, matrices, mean_response_error, prior_score, solve_linear


@pytest.fixture(scope="module")
def coupled(other_examples):
    import sdelang
    return {"cld": other_examples["cld"].build(), "schedule": sdelang.load(SCHEDULE).double()}


def linear_flow(sde, u_T, t1):
    """The flow ODE with the prior's score, du/dt = F u + D P (u - mu_T) / 2, from T to t1 (scipy DOP853)."""
    P = torch.cholesky_inverse(sde._prior_chol).numpy()
    mu = sde._prior_mean.numpy()

    def rhs(t, y):
        F, D = matrices(sde, t)
        return F @ y + D @ P @ (y - mu) / 2
    return solve_linear(rhs, np.asarray(u_T, dtype=float), float(sde.T), t1)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("name", ["cld", "schedule"])
def test_exact_for_the_prior_score(coupled, name, order):
    """With s = s_G the integrated part vanishes and the exact linear steps compose to the flow map, in 3
    steps: each entry's state at eps against scipy to 1e-8 relative (measured 1e-12)."""
    sde = coupled[name]
    u_T = torch.tensor([[2.0, 0.5, -1.0, 0.3]], dtype=F64)      # (x, x, v, v) for C = 2 entries
    out = sampling.coupled_exponential(sde, prior_score(sde), (1, 4), 3, x_T=u_T, order=order)
    got = components(sde, out.x)[0]                               # [K, C]
    for c in range(2):
        expected = linear_flow(sde, components(sde, u_T)[0, :, c].numpy(), float(sde.eps))
        torch.testing.assert_close(got[:, c], torch.from_numpy(expected), rtol=1e-8, atol=1e-8)
    assert out.nfe == 3


def test_mean_response_beats_splitting_and_em(coupled):
    """CLD with Gaussian data and the exact score: the error of d x_eps / d mu (test_kinds_sampling's
    mean_response_error, scipy reference) at 100 steps, measured 1.9e-3 against splitting's 1.69e-2 and
    em's 1.89e-2, and falling faster than first order (measured log2(e(100) / e(200)) = 1.62)."""
    cld = coupled["cld"]
    coarse, fine = (mean_response_error(cld, "exponential", steps) for steps in (100, 200))
    assert coarse < 0.25 * mean_response_error(cld, "splitting", 100)
    assert math.log2(coarse / fine) > 1.4


def test_refused_on_other_kinds(examples):
    sde = examples["vp"].build()
    with pytest.raises(ValueError, match="exponential needs a coupled linear SDE"):
        sampling.coupled_exponential(sde, lambda x, t: -x, (4, 2), 3)
