"""Derived expressions written through the user's helpers (compiler/codegen/fold.py).

Folding only changes the form: a folded expression, its helper calls replaced by their bodies, is the same
function (checked exactly by SymPy and at random points by mpmath, for random helper bodies and random
multiples of them). The generated `sde` and `diffusion` read `beta = ...` as the source does and return
what the unfolded derivation gives; a helper whose name the method needs for itself stays inlined.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import mpmath
import pytest
import sympy as sp
import torch
from hypothesis import given, settings, strategies as st

from sdelang.cli import main
from sdelang.cli.show import show
from sdelang.compiler import compile_source
from sdelang.compiler.codegen.fold import calls, fold
from sdelang.compiler.ir import Helper
from sdelang.errors import Source

ROOT = Path(__file__).resolve().parents[1]
t, x, p, q = sp.symbols("t x p q", real=True)
BODIES = [p + q * t, p * sp.exp(q * t), sp.sqrt(p + t**2), p * (q / p)**t, sp.sin(q * t) + 2, 1 - sp.exp(-p * t),
          sp.log(1 + p * t)]
FACTORS = [sp.Integer(1), -sp.Rational(1, 2), q, -x / 2, 2 * p / q]


def unfold(expr: sp.Expr, helpers: tuple[Helper, ...]) -> sp.Expr:
    return expr.xreplace({calls(helpers, t)[h.name]: h.body for h in helpers})


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.sampled_from(BODIES), st.sampled_from(FACTORS), st.sampled_from(["sqrt", "square", "plus_t", "plain"]))
def test_folding_keeps_the_function(body, factor, shape):
    helpers = (Helper("h", body),)
    inner = sp.expand(factor * body)   # as a derivation distributes it: -p/2 - q t/2, not -(p + q t)/2
    expr = {"sqrt": sp.sqrt(inner), "square": inner**2, "plus_t": inner + t, "plain": inner}[shape]
    folded = fold(expr, helpers, t)
    assert sp.simplify(unfold(folded, helpers) - expr) == 0
    point = {t: sp.Rational(3, 10), x: sp.Rational(7, 10), p: sp.Rational(13, 10), q: sp.Rational(11, 10)}
    with mpmath.workdps(40):
        assert abs(complex(unfold(folded, helpers).xreplace(point).evalf(40))
                   - complex(expr.xreplace(point).evalf(40))) < 1e-30


def test_a_distributed_multiple_is_found():
    beta = Helper("beta", p + t * (q - p))
    drift = x * (-p / 2 - t * (q - p) / 2)       # what the derivation of -1/2 beta(t) x gives
    call = calls((beta,), t)["beta"]
    assert fold(drift, (beta,), t) == -x * call / 2
    assert fold(sp.sqrt(p + t * (q - p)), (beta,), t) == sp.sqrt(call)
    assert fold(p * t, (beta,), t) == p * t      # not a multiple: left as it is


VP = """sde vp_helpers
param beta_min = 0.1
param beta_max = 20
beta(t) = beta_min + t * (beta_max - beta_min)
dx = -1/2 * beta(t) * x dt + sqrt(beta(t)) dw
"""


def load(text: str, tmp_path, name: str):
    compiled = compile_source(Source(text, f"{name}.sde"))
    path = tmp_path / f"{name}.py"
    path.write_text(compiled.code)
    spec = importlib.util.spec_from_file_location(f"fold_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return compiled, module.SDE().double()


def test_generated_sde_reads_through_the_helper(tmp_path):
    compiled, sde = load(VP, tmp_path, "vp_helpers")
    source = compiled.code.split("    def sde(self, x, t):", 1)[1].split("\n    def ", 1)[0]
    assert "beta = " in source and "torch.sqrt(beta)" in source
    t_values = torch.tensor([1e-5, 0.3, 1.0], dtype=torch.float64)
    x_values = torch.ones(3, 2, dtype=torch.float64)
    drift, g = sde.sde(x_values, t_values)
    beta = 0.1 + t_values * 19.9
    torch.testing.assert_close(drift, -0.5 * beta[:, None] * x_values, rtol=1e-15, atol=0)
    torch.testing.assert_close(g, beta.sqrt(), rtol=1e-15, atol=0)
    torch.testing.assert_close(sde.diffusion(t_values), beta.sqrt(), rtol=1e-15, atol=0)


@pytest.mark.parametrize("name", ["a", "g", "torch", "w0", "drift"])
def test_a_helper_named_like_a_local_of_the_method_stays_inlined(tmp_path, name):
    text = VP.replace("sde vp_helpers", f"sde vp_{name.lower()}").replace("beta(t)", f"{name}(t)")
    compiled, sde = load(text, tmp_path, f"vp_{name.lower()}")
    source = compiled.code.split("    def sde(self, x, t):", 1)[1].split("\n    def ", 1)[0]
    assert f"torch.sqrt({name})" not in source and "torch.sqrt(w0 + self.beta_min)" in source
    t_values = torch.tensor([1e-5, 0.5], dtype=torch.float64)
    drift, g = sde.sde(torch.ones(2, 1, dtype=torch.float64), t_values)
    torch.testing.assert_close(g[:, None] if g.dim() == 1 else g, (0.1 + t_values * 19.9).sqrt()[:, None])


def test_show_defines_the_helpers_and_uses_them():
    text = show(compile_source(Source(VP, "vp_helpers.sde")).derivation)
    lines = {line.split("  ")[1].strip(): line.rsplit("  ", 1)[1] for line in text.splitlines()[1:]}
    assert lines["beta(t) (helper)"] == "beta_min + t*(beta_max - beta_min)"
    assert lines["drift f(x, t)"] == "-x*beta(t)/2"
    assert lines["diffusion g(t)"] == "sqrt(beta(t))"


def test_show_writes_a_helper_with_the_argument_the_program_named():
    """U(y) = ... applied to x is shown as U(y), not renamed to the time symbol; the drift is the state's."""
    program = ("sde potential\nU(y) = y^4 / 4 - y^2 / 2\nh(u) = u^3 - u\ndx = -h(x) dt + sqrt(2) dw\n"
               "prior normal(0, 1)\nweighting 1\n")
    text = show(compile_source(Source(program, "potential.sde")).derivation)
    lines = {line.split("  ")[1].strip(): line.rsplit("  ", 1)[1] for line in text.splitlines()[1:]}
    assert lines["U(y) (helper)"] == "y**4/4 - y**2/2"
    assert lines["h(u) (helper)"] == "u**3 - u"
    assert lines["drift f(x, t)"] == "-x**3 + x"


def test_show_of_every_example_runs(capsys):
    for example in ("subvp", "cosine_vp", "vdm", "ve"):
        assert main(["show", str(ROOT / "examples" / f"{example}.sde")]) == 0
    out = capsys.readouterr().out
    assert "B(t) (helper)" in out and "exp(-B(t)/2)" in out     # sub-VP's mean through its B(t)
