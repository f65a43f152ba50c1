"""`sdelang train / sample / nll` end to end on tiny runs, and their error handling."""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest

from sdelang.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--steps", "20", "--batch", "64", "--width", "16", "--depth", "1", "--quiet", "--threads", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny two-moons run, and what `sdelang train` printed."""
    out = tmp_path_factory.mktemp("runs") / "moons"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["train", str(ROOT / "examples" / "vp_likelihood.sde"), "--data", "moons", "--out", str(out),
                     *TINY]) == 0
    return out, printed.getvalue()


@pytest.fixture
def moons_run(trained):
    return trained[0]


def test_train_prints_a_summary_and_writes_the_run(trained):
    out, printed = trained
    header, _, row = printed.splitlines()
    assert header.split() == ["run", "sde", "data", "steps", "final", "loss", "seconds", "parameters"]
    assert row.split()[:4] == [str(out), "vp_likelihood.sde", "moons", "20"]
    assert (out / "run.json").is_file() and (out / "checkpoint.pt").is_file()
    assert (out / "samples_000020.png").is_file()


def test_sample_json_reports_nfe_and_a_two_sample_test(moons_run, tmp_path, capsys):
    plot = tmp_path / "s.png"
    assert main(["sample", str(moons_run), "--method", "em", "--steps", "10", "-n", "200", "--json",
                 "--plot", str(plot)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "em" and result["n"] == 200
    assert result["nfe"] == 11                        # 10 Euler-Maruyama steps + the final denoising step
    assert 0 < result["p_value"] <= 1 and math.isfinite(result["mmd"])
    assert plot.stat().st_size > 1000


def test_sample_json_for_several_methods_is_one_object(moons_run, capsys):
    assert main(["sample", str(moons_run), "--method", "em,ddim", "--steps", "3", "-n", "20", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in result["results"]] == ["em", "ddim"]
    assert [r["nfe"] for r in result["results"]] == [4, 4]


def test_sample_runs_the_few_step_samplers(moons_run, capsys):
    """Every multistep sampler is a --method of `sdelang sample`, one score evaluation per step."""
    methods = ["dpmpp_2m", "dpmpp_3m", "dpmpp_3m_published", "unipc", "unipc_3m", "deis", "lms"]
    assert main(["sample", str(moons_run), "--method", ",".join(methods), "--steps", "6", "-n", "20",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in result["results"]] == methods
    assert [r["nfe"] for r in result["results"]] == [7] * len(methods)


def test_sample_takes_every_spacing_of_the_runtime(moons_run, capsys):
    """--spacing offers every grid of sampling.grids, the floored one too, and each changes the samples."""
    from sdelang.runtime.sampling.grids import SPACINGS
    samples = {}
    for spacing in SPACINGS:
        assert main(["sample", str(moons_run), "--method", "dpmpp_2m", "--steps", "6", "-n", "20", "--spacing",
                     spacing, "--json"]) == 0
        samples[spacing] = json.loads(capsys.readouterr().out)["mmd"]
    assert len(set(samples.values())) == len(SPACINGS)


def test_sample_several_methods_prints_a_table(moons_run, tmp_path, capsys):
    assert main(["sample", str(moons_run), "--method", "em,dpm", "--steps", "5", "-n", "50",
                 "--plot", str(tmp_path / "s.png")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:4] == ["method", "n", "NFE", "seconds"]
    assert {line.split()[0] for line in out.splitlines()[2:4]} == {"em", "dpm2"}
    assert (tmp_path / "s.png").stat().st_size > 1000   # one figure, a panel per method
    assert "plot: " + str(tmp_path / "s.png") in out


def test_nll_json_has_the_documented_keys(moons_run, capsys):
    assert main(["nll", str(moons_run), "-n", "32", "--json", "--tol", "1e-3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"nll_nats", "bpd", "stderr", "nfe", "n"} <= result.keys()
    assert result["n"] == 32 and result["nfe"] > 0 and result["stderr"] > 0
    # continuous 2-D points: bits/dim is the NLL in bits divided by the dimension, no offset
    assert result["bpd"] == pytest.approx(result["nll_nats"] / (2 * math.log(2)), rel=1e-9)



@pytest.mark.parametrize("norm", ["max", "shared"])
def test_nll_norm_reaches_the_solver(moons_run, capsys, norm):
    """--norm is the step-error norm log_likelihood gets: the NFE and NLL of evaluate.nll with that norm."""
    from sdelang.runtime.data import load_data
    from sdelang.runtime.evaluate import nll
    from sdelang.runtime.training import load_run

    assert main(["nll", str(moons_run), "-n", "32", "--json", "--tol", "1e-3", "--norm", norm]) == 0
    result = json.loads(capsys.readouterr().out)
    run = load_run(moons_run)
    test = load_data(run.config.data, split="test")
    expected, default = (nll(run.model, test, n=32, rtol=1e-3, atol=1e-3, norm=name) for name in (norm, "balanced"))
    assert (result["nfe"], result["nll_nats"]) == (expected.nfe, pytest.approx(expected.nll_nats, rel=1e-12))
    assert (expected.nfe, expected.nll_nats) != (default.nfe, default.nll_nats)

def test_digits_train_and_bits_per_dim(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "digits"
    assert main(["train", str(ROOT / "examples" / "vp.sde"), "--data", "digits", "--model", "unet", "--out", str(out),
                 "--steps", "3", "--batch", "8", "--width", "8", "--depth", "2", "--quiet"]) == 0
    assert main(["nll", str(out), "-n", "4", "--json", "--tol", "1e-3"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    # 8-bit data scaled to [-1, 1]: bpd = -(log p_x + D ln 2) / (D ln 2) + 8 = nll / (D ln 2) + 7
    assert result["bpd"] == pytest.approx(result["nll_nats"] / (64 * math.log(2)) + 7, rel=1e-9)


@pytest.mark.parametrize("argv, message", [
    (["train", "examples/vp.sde", "--data", "moon", "--out", "{tmp}/x", "--steps", "1"], "did you mean 'moons'"),
    (["train", "examples/vp.sde", "--out", "{tmp}/x", "--steps", "0"], "steps must be >= 1"),
    (["sample", "{tmp}"], "not a run directory"),
    (["nll", "{tmp}"], "not a run directory"),
    (["sample", "{run}", "--method", "magic"], "unknown sampling method 'magic'"),
    (["nll", "{run}", "--threads", "0"], "--threads must be >= 1"),
    (["sample", "{run}", "--method", "ode", "--spacing", "logsnr"], "--spacing does not apply to 'ode'"),
    # --param as `compile` takes it (an internal error, and N=0 a ZeroDivisionError, before):
    (["train", "examples/vp.sde", "--param", "beta_mx=3", "--out", "{tmp}/x", "--steps", "1"],
     "unknown parameter 'beta_mx'"),
    (["train", "examples/vp.sde", "--param", "N=0", "--out", "{tmp}/x", "--steps", "1"], "unknown parameter 'N'"),
    # a path under a file: one line naming it (train: was "[Errno 20] ..."), sample before it samples
    (["train", "examples/vp.sde", "--out", "{tmp}/file/run", "--steps", "1"], "cannot "),
    (["sample", "{run}", "--method", "em", "--steps", "2", "-n", "5", "--save", "{tmp}/file/x.npy"],
     "is a file, not a folder"),
])
def test_runtime_errors_are_reported_without_traceback(argv, message, tmp_path, moons_run, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    (tmp_path / "file").write_text("a file where a folder is expected\n")
    argv = [a.format(tmp=tmp_path, run=moons_run) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_train_param_overrides_reach_the_sde(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(ROOT / "examples" / "vp.sde"), "--data", "gaussian", "--out", str(out),
                 "--param", "beta_max=10", "--steps", "2", "--batch", "16", "--width", "8", "--depth", "1", "--quiet"]) == 0
    assert json.loads((out / "run.json").read_text())["params"] == {"beta_max": 10.0}
    from sdelang.runtime.training import load_run
    assert load_run(out).sde.beta_max == 10.0


def test_quick_checks_find_a_wrong_kernel(compiled):
    """The rows train and sample run (no Monte Carlo) catch a variance 2 % off, and pass the module."""
    from sdelang.verify import quick_checks

    module = compiled("vp").module
    assert quick_checks(module.SDE()) == []

    class Wrong(module.SDE):
        def marginal_prob(self, x, t):
            mean, std = super().marginal_prob(x, t)
            return mean, std * 1.01

    failed = {row.name for row in quick_checks(Wrong())}
    assert "v' = 2 a v + g^2" in failed


def test_train_and_sample_warn_when_a_quick_check_fails(moons_run, tmp_path, capsys, monkeypatch):
    from sdelang import verify
    from sdelang.verify.common import CheckResult

    monkeypatch.setattr(verify, "quick_checks", lambda sde: [CheckResult("m' = a m", "FAIL", 0.1, 0.01, "note")])
    assert main(["sample", str(moons_run), "--method", "em", "--steps", "2", "-n", "10", "--quiet"]) == 0
    assert "warning: vp_likelihood.sde: check 'm' = a m' failed (measured 0.1, tolerance 0.01; note)" \
        in capsys.readouterr().err


def test_sample_counts_outliers_in_json_and_warns_in_the_table(moons_run, monkeypatch, capsys):
    """Samples beyond 3 data standard deviations x sqrt(d) are counted (JSON `outliers`, `outlier_radius`)
    and flagged under the table. The sampler is replaced by one returning 3 far points among 17 near ones,
    and a NaN, which counts too."""
    import torch

    import sdelang.runtime.sampling as sampling
    from sdelang.runtime.sampling import Samples

    def planted(sde, score_fn, shape, **kwargs):
        x = torch.zeros(shape, dtype=torch.float32)
        x[:3] = torch.tensor([100.0, -50.0])
        x[3] = torch.nan
        return Samples(x, 7)
    monkeypatch.setattr(sampling, "sample", planted)
    assert main(["sample", str(moons_run), "--method", "dpmpp_2m", "-n", "21", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["outliers"] == 4
    assert 3 * 0.9 * math.sqrt(2) < result["outlier_radius"] < 3 * 1.1 * math.sqrt(2)  # moons: data std ~1
    assert main(["sample", str(moons_run), "--method", "dpmpp_2m", "-n", "21"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[2].split()[4] == "4"
    assert "warning: dpmpp_2m: 4 of 21 samples lie beyond |x| = " in out
    # The causes it names: the prior against p_T first, and the flow only for a deterministic sampler.
    assert "a prior that does not match the SDE's p_T (`sdelang check`" in out and "deterministic sampler" in out
    assert main(["sample", str(moons_run), "--method", "em", "-n", "21"]) == 0
    out = capsys.readouterr().out
    assert "warning: em: 4 of 21" in out and "deterministic" not in out and "stochastic sampler" in out


def test_sample_outliers_match_the_saved_samples(moons_run, tmp_path, capsys):
    import numpy as np

    assert main(["sample", str(moons_run), "--method", "heun", "--steps", "5", "-n", "300", "--json",
                 "--save", str(tmp_path / "x.npy")]) == 0
    result = json.loads(capsys.readouterr().out)
    norms = np.linalg.norm(np.load(tmp_path / "x.npy"), axis=1)
    assert result["outliers"] == int((~(norms <= result["outlier_radius"])).sum())


def test_sample_refuses_an_unwritable_save_before_sampling(moons_run, tmp_path, capsys, monkeypatch):
    """--save under a file is refused before any sampler runs (it was refused after sampling, with an errno)."""
    from sdelang.runtime import sampling

    (tmp_path / "file").write_text("x\n")
    monkeypatch.setattr(sampling, "sample", lambda *a, **k: pytest.fail("sampled before checking --save"))
    assert main(["sample", str(moons_run), "--method", "em", "--steps", "2", "-n", "5",
                 "--save", str(tmp_path / "file" / "x.npy")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file, not a folder" in err


def test_compile_names_an_unwritable_target_once(tmp_path, capsys):
    (tmp_path / "file").write_text("x\n")
    assert main(["compile", str(ROOT / "examples" / "vp.sde"), "-o", str(tmp_path / "file" / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("cannot write") == 1, err


def test_a_stiff_general_sde_trains_with_more_simulation_steps(tmp_path, capsys):
    """dx = -50 x^3 dt + dw is stable, but 64 Euler steps to each training x_t overflow: the loss turns NaN. That was
    an internal error (exit 3) naming a setting the command line did not have; it is exit 1 now, naming
    --simulation-steps, and with 1024 steps the same run trains."""
    program = tmp_path / "stiff.sde"
    program.write_text("sde stiff\ndx = -50 * x^3 dt + dw\nt in [1e-3, 5]\nprior normal(0, 1)\nweighting 1\n")
    argv = ["train", str(program), "--data", "gaussian", "--steps", "10", "--batch", "32", "--width", "8",
            "--depth", "1", "--quiet", "--plot-samples", "0"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 1
    assert "--simulation-steps" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "b"), "--simulation-steps", "1024"]) == 0
    assert json.loads((tmp_path / "b" / "run.json").read_text())["simulation_steps"] == 1024
