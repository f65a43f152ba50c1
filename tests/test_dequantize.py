"""Variational dequantisation: q(u | k)'s log-density by the change of variables, its range, and bits/dim."""
from __future__ import annotations

import math

import pytest
import torch

from sdelang.runtime.data import Dataset
from sdelang.runtime.dequantize import Dequantizer, DequantizerConfig, fit, load, logistic_logpdf, save
from sdelang.runtime.evaluate import nll
from sdelang.runtime.likelihood import bits_per_dim


def _randomised(shape, seed=0, couplings=3, dtype=torch.float64):
    """A dequantiser whose couplings are not the identity (the zero-initialised last layers get random weights)."""
    torch.manual_seed(seed)
    deq = Dequantizer(DequantizerConfig(shape, width=8, couplings=couplings)).to(dtype)
    with torch.no_grad():
        for layer in deq.layers:
            layer.net[-1].weight.normal_(0, 0.3)
            layer.net[-1].bias.normal_(0, 0.3)
    return deq


@pytest.mark.parametrize("shape", [(1, 2, 2), (3, 2, 1), (2, 1, 3)])
def test_log_density_is_the_change_of_variables(shape):
    """log q(u | k) against log Logistic(eps) - log |det du/deps| with the Jacobian from autograd's
    jacobian of the map eps -> u (a dense D x D matrix, so a wrong triangular shortcut shows up)."""
    deq = _randomised(shape)
    k = torch.randint(0, 256, (1,) + shape, generator=torch.Generator().manual_seed(1)).double()
    eps = torch.randn((1,) + shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    u, log_q = deq.transform(eps, k)
    jacobian = torch.autograd.functional.jacobian(lambda e: deq.transform(e.view_as(eps), k)[0].flatten(),
                                                  eps.flatten())
    expected = logistic_logpdf(eps).sum() - torch.linalg.slogdet(jacobian)[1]
    assert torch.allclose(log_q, expected.reshape(1), rtol=0, atol=1e-10), (log_q, expected)
    # and the couplings do act: the Jacobian is neither diagonal nor the identity's logistic map
    assert (jacobian - torch.diag(jacobian.diagonal())).abs().max() > 1e-3


def test_log_density_against_finite_differences():
    """The same identity with a central-difference Jacobian (no autograd at all), step 1e-6 in float64:
    its error is O(h^2) ~ 1e-12 relative, well inside 1e-6."""
    shape = (1, 2, 2)
    deq = _randomised(shape, seed=3)
    k = torch.tensor([[[[0.0, 255.0], [17.0, 128.0]]]], dtype=torch.float64)
    eps = torch.tensor([[[[0.3, -1.2], [2.0, 0.1]]]], dtype=torch.float64)
    h = 1e-6
    torch.set_grad_enabled(False)   # restored by the test's end below; plain arithmetic only
    columns = []
    for i in range(4):
        step = torch.zeros(4, dtype=torch.float64)
        step[i] = h
        plus = deq.transform(eps + step.view_as(eps), k)[0].flatten()
        minus = deq.transform(eps - step.view_as(eps), k)[0].flatten()
        columns.append((plus - minus) / (2 * h))
    jacobian = torch.stack(columns, 1)
    expected = logistic_logpdf(eps).sum() - torch.linalg.slogdet(jacobian)[1]
    value = float(deq.transform(eps, k)[1])
    torch.set_grad_enabled(True)
    assert abs(value - float(expected)) < 1e-6


def test_untrained_dequantiser_is_uniform():
    """Zero-initialised couplings: log q = 0 exactly and u ~ U(0, 1) (sigmoid of a logistic draw). Mean and
    quarters within 5 standard errors (sqrt(1/12 / n), sqrt(3/16 / n)) of n = 2^16 draws."""
    deq = Dequantizer(DequantizerConfig((1, 16, 16)))
    k = torch.arange(256.0).reshape(1, 1, 16, 16).expand(256, 1, 16, 16)
    with torch.no_grad():
        u, log_q = deq.sample(k, torch.Generator().manual_seed(0))
    assert torch.equal(log_q, torch.zeros(256))
    n = u.numel()
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / n)
    quarters = torch.bincount((u.flatten() * 4).long(), minlength=4).double() / n
    assert (quarters - 0.25).abs().max() < 5 * math.sqrt(3 / 16 / n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_range_is_half_open_and_bins_are_kept(dtype):
    """Extreme base draws (v far beyond where sigmoid rounds to 1 or 0) still give 0 <= u < 1, and k + u maps
    to model space and back to k for every 8-bit value."""
    deq = _randomised((1, 16, 16), seed=5, dtype=dtype)
    k = torch.arange(256.0, dtype=dtype).reshape(1, 1, 16, 16).expand(3, 1, 16, 16)
    eps = torch.stack([torch.full((1, 16, 16), 60.0), torch.full((1, 16, 16), -60.0),
                       torch.linspace(-40, 40, 256).reshape(1, 16, 16)]).to(dtype)
    with torch.no_grad():
        u, log_q = deq.transform(eps, k)
    assert (u >= 0).all() and (u < 1).all() and torch.isfinite(log_q).all()
    bits = 24 - 8 if dtype == torch.float32 else 53 - 8
    assert (u == 1 - 2.0**-bits).any() and (u == 0).any()    # both ends were reached, and clamped
    data = Dataset("t", k[:1].float(), "image", 256, (1, 16, 16))
    x = data.to_model(k.to(dtype), u)
    assert torch.equal(torch.floor((x + 1) / 2 * 256), k)


def test_bits_per_dim_with_a_dequantiser():
    """bpd = -(log p_x + D log 2 - log q) / (D ln 2) + 8 per image, with log p_x from the flow ODE at the u that q
    drew and log q its log-density: `nll` with a dequantiser reports their mean and standard error."""
    shape = (1, 2, 2)
    data = Dataset("t", torch.randint(0, 256, (6,) + shape).float(), "image", 256, shape)
    logp = torch.tensor([-3.0, 1.5])
    D = 4
    manual = -(logp + D * math.log(2)) / (D * math.log(2)) + 8
    assert torch.allclose(bits_per_dim(logp, D), manual)

    class GaussianScore(torch.nn.Module):    # s = -x for a VP SDE: a fixed, cheap model
        def __init__(self, sde):
            super().__init__()
            self.sde = sde

        def forward(self, x, t):
            return -x

    from sdelang import load as load_sde
    sde = load_sde("examples/vp.sde").double()
    model = GaussianScore(sde)
    data64 = Dataset("t", data.x.double(), "image", 256, shape)
    from sdelang.runtime.likelihood import log_likelihood
    deq = _randomised(shape, seed=7)
    k = data64.x
    with torch.no_grad():
        u, log_q = deq.sample(k, torch.Generator().manual_seed(4))    # nll draws the same u from its seed
    assert log_q.abs().min() > 0.01
    result = nll(model, data64, n=6, seed=4, exact_trace=True, dequantizer=deq)
    logp_x = log_likelihood(sde, model, data64.to_model(k, u), exact_trace=True).logp
    expected = bits_per_dim(logp_x - log_q, D)
    assert abs(result.bpd - float(expected.mean())) < 1e-9
    assert abs(result.stderr - float(expected.std() / math.sqrt(6))) < 1e-9


class BinPeaks(torch.nn.Module):
    """The exact score of data that sit near the centres of their 8-bit bins: each entry is a mixture of
    N(c_j, w^2) over the 256 bin centres c_j in model space, diffused by the SDE's kernel, so at time t a
    mixture of N(m c_j, m^2 w^2 + v). Its density inside a bin is far from flat, which is what a
    variational dequantiser can exploit (KL(U || p(u | k)) of several nats per image)."""

    def __init__(self, sde, width: float):
        super().__init__()
        self.sde, self.width = sde, width
        self.register_buffer("centres", (torch.arange(256.0) + 0.5) * (2 / 256) - 1)

    def forward(self, x, t):
        shape = (-1,) + (1,) * x.dim()
        m = self.sde.mean_coeff(t).view(shape)
        var = m**2 * self.width**2 + self.sde.std(t).view(shape) ** 2
        diff = x[..., None] - m * self.centres
        weights = torch.softmax(-diff**2 / (2 * var), dim=-1)
        return -(weights * diff).sum(-1) / var[..., 0]


def test_fit_lowers_the_bound_and_round_trips(tmp_path):
    """Against a fixed score whose density peaks inside every bin, fitting q lowers E[L + log q] from its
    uniform start by more than 5 standard errors of the difference (the same images and evaluation noise
    before and after; the SE from the per-image spread of the difference). The score model stays fixed, and
    the saved dequantiser loads with the same outputs."""
    from sdelang import load as load_sde
    from sdelang.runtime.dequantize import objective

    shape = (1, 4, 4)
    sde = load_sde("examples/vp_likelihood.sde")
    model = BinPeaks(sde, width=0.1 * 2 / 256)
    k = torch.randint(0, 256, (64, *shape), generator=torch.Generator().manual_seed(0)).float()
    data = Dataset("t", k, "image", 256, shape)
    deq = Dequantizer(DequantizerConfig(shape, width=8, couplings=2))

    def evaluate():
        with torch.no_grad():
            return torch.stack([objective(sde, model, deq, data, k, generator=torch.Generator().manual_seed(s),
                                          samples=8) for s in range(4)]).mean(0)

    before = evaluate()
    fit(model, deq, data, steps=60, batch=64, lr=1e-2, samples=2, log_every=20)
    gain = before - evaluate()
    assert gain.mean() > 5 * gain.std() / math.sqrt(len(gain)), (gain.mean(), gain.std())
    assert torch.equal(model.centres, (torch.arange(256.0) + 0.5) * (2 / 256) - 1)
    save(deq, tmp_path, 60)
    again = load(tmp_path)
    probe = torch.randn(2, *shape)
    assert torch.equal(again.transform(probe, k[:2])[1], deq.eval().transform(probe, k[:2])[1])
    assert load(tmp_path / "nowhere") is None


def test_joint_fit_trains_the_score_network_too():
    from sdelang import load as load_sde
    from sdelang.runtime.config import ModelConfig
    from sdelang.runtime.models import build_model

    shape = (1, 4, 4)
    sde = load_sde("examples/vp_likelihood.sde")
    model = build_model(sde, shape, ModelConfig(kind="mlp", width=16, depth=1, embedding=8))
    data = Dataset("t", torch.randint(0, 256, (32, *shape), generator=torch.Generator().manual_seed(1)).float(),
                   "image", 256, shape)
    before = [p.clone() for p in model.parameters()]
    fit(model, Dequantizer(DequantizerConfig(shape, width=8, couplings=2)), data, steps=3, batch=16)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))     # the score model is fixed
    fit(model, Dequantizer(DequantizerConfig(shape, width=8, couplings=2)), data, steps=3, batch=16, joint=True,
        score_lr=1e-2)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # ... unless joint
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_cli_dequantize_then_nll_reports_both(tmp_path, capsys):
    pytest.importorskip("sklearn")
    import json
    from pathlib import Path

    from sdelang.cli import main

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "digits"
    assert main(["train", str(root / "examples" / "vp_likelihood.sde"), "--data", "digits", "--out", str(out),
                 "--steps", "3", "--batch", "8", "--width", "8", "--depth", "2", "--plot-samples", "0", "--quiet"]) == 0
    assert main(["dequantize", str(out), "--steps", "4", "--batch", "8", "--width", "4", "--couplings", "2",
                 "--quiet"]) == 0
    assert (out / "dequantizer.pt").is_file()
    capsys.readouterr()
    assert main(["nll", str(out), "-n", "4", "--json", "--tol", "1e-3", "--bound"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert set(result) == {"uniform", "variational"}
    for r in result.values():
        assert r["bpd"] == pytest.approx(r["nll_nats"] / (64 * math.log(2)) + 7, rel=1e-9)
        assert r["bound_bpd"] == pytest.approx(r["bound_nats"] / (64 * math.log(2)) + 7, rel=1e-9)
        assert r["bound_stderr"] > 0 and r["stderr"] > 0
    assert main(["nll", str(out), "-n", "4", "--tol", "1e-3"]) == 0
    printed = capsys.readouterr().out
    assert "uniform" in printed and "variational" in printed
    # --joint: the score weights trained with q go into the dequantiser file and into nll's variational row,
    # while the run's own checkpoint (the uniform row) is left unchanged
    assert main(["dequantize", str(out), "--steps", "3", "--batch", "8", "--width", "4", "--couplings", "2",
                 "--joint", "--score-lr", "1e-2", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["nll", str(out), "-n", "4", "--json", "--tol", "1e-3"]) == 0
    joint = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (joint["uniform"]["nll_nats"], joint["uniform"]["bpd"]) == (result["uniform"]["nll_nats"],
                                                                     result["uniform"]["bpd"])
    assert main(["nll", str(out), "-n", "4", "--tol", "1e-3"]) == 0
    assert "variational (joint)" in capsys.readouterr().out


def test_cli_dequantize_refuses_points(tmp_path, capsys):
    from pathlib import Path

    from sdelang.cli import main

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "moons"
    assert main(["train", str(root / "examples" / "vp.sde"), "--data", "moons", "--out", str(out), "--steps", "2",
                 "--batch", "8", "--width", "8", "--depth", "1", "--plot-samples", "0", "--quiet"]) == 0
    assert main(["dequantize", str(out), "--steps", "1"]) == 2
    assert "continuous points" in capsys.readouterr().err
