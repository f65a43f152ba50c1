"""The golden modules in generated/: in sync with examples/, deterministic, standalone, complete.

generated/<name>.py is what `sdelang compile examples/<name>.sde -o generated` writes today, byte
for byte; compiling is deterministic within and across processes; every generated module imports
only math and torch and offers the documented API, with each formula in its docstring and the
source's parameter defaults in its constructor.
"""
from __future__ import annotations

import ast
import difflib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import mpmath
import pytest
import sympy as sp
import torch

import sdelang
from sdelang.compiler import read_source

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.sde"))
REGENERATE = "sdelang compile examples/*.sde -o generated"
AFFINE = [name for name in EXAMPLES if (ROOT / "generated" / f"{name}.py").exists()
          and 'kind = "affine"' in (ROOT / "generated" / f"{name}.py").read_text()]
FAST = ["vp", "edm_ve"]  # the two quickest examples to compile (about 1 s and 0.1 s)

# The documented API (README "Methods" and docs/language.md).
METHODS = ["sde", "prior_sampling", "prior_logp", "reverse", "weight", "t_density", "t_cdf", "t_icdf", "sample_t",
           "drift_divergence", "marginal_prob"]
KIND_METHODS = {
    "affine": ["diffusion", "discretize", "mean_coeff", "mean_offset", "std", "log_snr"],
    "general": ["discretize", "noise_gradient"],
    "coupled": ["diffusion", "kernel", "transition", "perturb", "noise_to_score", "split", "join", "data",
                "init_sampling", "init_logp", "profile", "time_change"],
}


def golden(name: str) -> Path:
    return ROOT / "generated" / f"{name}.py"


def short_diff(old: str, new: str, old_name: str, new_name: str, lines: int = 40) -> str:
    diff = list(difflib.unified_diff(old.splitlines(), new.splitlines(), old_name, new_name, lineterm="", n=1))
    return "\n".join(diff[:lines]) + ("\n..." if len(diff) > lines else "")


def test_the_examples_exist():
    """The parametrised tests below have something to check."""
    assert len(EXAMPLES) >= 8, EXAMPLES


# --- (a) generated/ is what the compiler writes today ----------------------------------------------

@pytest.mark.parametrize("name", EXAMPLES)
def test_golden_module_is_current(compiled, name):
    """generated/<name>.py is byte-identical to compiling examples/<name>.sde with the current compiler."""
    fresh = compiled(name).compiled
    assert fresh.name == name, (
        f"examples/{name}.sde declares 'sde {fresh.name}', so `{REGENERATE}` writes generated/{fresh.name}.py, "
        f"not generated/{name}.py: name the file after the SDE")
    path = golden(name)
    assert path.exists(), f"generated/{name}.py is missing; regenerate the golden modules with: {REGENERATE}"
    committed = path.read_bytes()
    if committed != fresh.code.encode("utf-8"):
        pytest.fail(f"generated/{name}.py is out of date with examples/{name}.sde and the compiler.\n"
                    f"Regenerate the golden modules and review the diff with:\n\n    {REGENERATE}\n\n"
                    + short_diff(committed.decode("utf-8", "replace"), fresh.code, f"generated/{name}.py",
                                 "compiled now"), pytrace=False)


# --- (b) one generated module per example, and the shared fixtures cover them all -----------------

def test_every_example_has_a_golden_module_and_vice_versa():
    """examples/*.sde and generated/*.py name the same SDEs, and generated/ holds nothing else."""
    generated = ROOT / "generated"
    stray = sorted(p.name for p in generated.iterdir()
                   if p.name != "__pycache__" and not (p.is_file() and p.suffix == ".py"))
    modules = sorted(p.stem for p in generated.glob("*.py"))
    missing = sorted(set(EXAMPLES) - set(modules))
    orphans = sorted(set(modules) - set(EXAMPLES))
    assert not missing, f"no generated module for examples {missing}; run: {REGENERATE}"
    assert not orphans, f"generated modules {orphans} have no example source; delete them or restore the .sde"
    assert not stray, f"unexpected entries in generated/: {stray}"


def test_the_shared_fixtures_cover_every_example(examples, other_examples):
    """tests/conftest.py gives parameter ranges for exactly the examples, so the identity tests see each one:
    the affine ones in `examples`, the coupled and general ones in `other_examples`."""
    assert sorted([*examples, *other_examples]) == EXAMPLES
    assert {e.module.SDE.kind for e in examples.values()} == {"affine"}
    assert all(e.module.SDE.kind != "affine" for e in other_examples.values())


# --- (c) compiling is deterministic ----------------------------------------------------------------

@pytest.mark.parametrize("name", FAST)
def test_compiling_twice_gives_the_same_bytes(compiled, name):
    """A second compilation in the same process emits exactly the first one's text."""
    again = sdelang.compile_source(read_source(ROOT / "examples" / f"{name}.sde"))
    assert again.code == compiled(name).compiled.code


def test_compiling_in_other_processes_gives_the_same_bytes(compiled, tmp_path):
    """`python -m sdelang compile` under two hash seeds writes the same bytes as this process compiles.

    Differing PYTHONHASHSEEDs reorder every set and dict of strings, so any output that depends on such
    an order (say, a set of symbols printed unsorted) shows up here.
    """
    runs = {}
    for seed in ("0", "4242"):
        out = tmp_path / f"seed{seed}"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        runs[seed] = (out, subprocess.Popen([sys.executable, "-m", "sdelang", "compile", "examples/vp.sde", "-o",
                                             str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True))
    texts = {}
    for seed, (out, proc) in runs.items():
        try:
            _, err = proc.communicate(timeout=120)
        finally:
            proc.kill()  # no-op once it has exited
        assert proc.returncode == 0, err
        texts[seed] = (out / "vp.py").read_bytes()
    assert texts["0"] == texts["4242"], "the output depends on PYTHONHASHSEED:\n" + short_diff(
        texts["0"].decode(), texts["4242"].decode(), "PYTHONHASHSEED=0", "PYTHONHASHSEED=4242")
    assert texts["0"] == compiled("vp").compiled.code.encode("utf-8")


# --- (d) standalone: only math and torch -----------------------------------------------------------

@pytest.mark.parametrize("name", EXAMPLES)
def test_golden_module_imports_only_math_and_torch(name):
    """Every import statement of the module, at any depth, is of math or torch (or a torch submodule)."""
    tree = ast.parse(golden(name).read_text(encoding="utf-8"), filename=str(golden(name)))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import at line {node.lineno}"
            imported.add(node.module.split(".")[0])
    calls = {node.func.id for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert "torch" in imported
    assert imported <= {"math", "torch"}, f"imports {sorted(imported - {'math', 'torch'})}"
    assert not calls & {"__import__", "exec", "eval"}, "imports or runs code behind the import statements' back"


# --- (e) the documented API ------------------------------------------------------------------------

@pytest.mark.parametrize("name", EXAMPLES)
def test_golden_module_has_the_documented_api(all_examples, compiled, name):
    """SDE alias, class attributes, T/N/eps and every documented method, with values from the derivation."""
    module = all_examples[name].module
    d = compiled(name).compiled.derivation
    p = d.program
    cls = module.SDE
    assert isinstance(cls, type) and issubclass(cls, torch.nn.Module)
    assert cls.__name__.endswith("SDE") and getattr(module, cls.__name__) is cls
    assert cls.kind == p.kind
    missing = [m for m in METHODS + KIND_METHODS[cls.kind] if not callable(getattr(cls, m, None))]
    assert not missing, f"{cls.__name__} lacks {missing}"
    assert cls.kernel_path == d.kernel_path
    assert cls.inverse_cdf_path == d.inverse_cdf_path
    assert (cls.weighting, cls.t_sampling) == (p.weighting, p.t_sampling)
    sde = cls()
    defaults = p.defaults
    assert isinstance(sde.N, int) and sde.N == p.N
    # eps and T are printed as Python literals of the exact values: one rounding each.
    assert sde.eps == pytest.approx(float(p.eps.subs(defaults)), rel=1e-15)
    assert sde.T == pytest.approx(float(p.T.subs(defaults)), rel=1e-15)
    assert 0 < sde.eps < sde.T


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_public_method_has_a_docstring(all_examples, name):
    """Each public method of the SDE class and of its reverse-time class says what it computes."""
    sde = all_examples[name].module.SDE()
    reverse = sde.reverse(lambda x, t: -x)
    undocumented = []
    for cls in (type(sde), type(reverse)):
        for attr, value in vars(cls).items():
            if callable(value) and not attr.startswith("_") and not (inspect.getdoc(value) or "").strip():
                undocumented.append(f"{cls.__name__}.{attr}")
    assert not undocumented


# The docstrings that state one derived quantity: method -> (pattern of its first line, the quantity).
FORMULAS = {
    "diffusion": (r"g\(t\) = (?P<f>.+)", lambda d: d.program.diffusion),
    "mean_coeff": (r"m\(t\) = (?P<f>.+)", lambda d: d.kernel.m),
    "mean_offset": (r"c\(t\) = (?P<f>.+)", lambda d: d.kernel.c),
    "std": (r"sigma\(t\) = sqrt\(v\(t\)\) = (?P<f>.+)", lambda d: d.kernel.std),
    "log_snr": (r"logSNR\(t\) = log\(m\(t\)\^2 / v\(t\)\) = (?P<f>.+)", lambda d: d.log_snr),
    "weight": (r"lambda\(t\) = (?P<f>.+) \(\w+ weighting\)", lambda d: d.weight),
    "t_density": (r"Density of the training time t \(importance\): q\(t\) = lambda / \(Z v\) = (?P<f>.+)",
                  lambda d: d.importance.density),
    "t_cdf": (r"CDF of the training time t: (?P<f>.+)", lambda d: d.importance.cdf),
}
SUMMARISED = "(a long expression with numeric integrals; see `sdelang show`)"


def value(expr: sp.Expr, digits: int = 30) -> sp.Float:
    """expr (numbers only) to ``digits`` digits; integrals by mpmath quadrature, much faster than evalf's."""
    def integrate(*args):
        (s, lo, hi), = sp.Integral(*args).limits
        with mpmath.workdps(digits):
            return sp.Float(mpmath.quad(sp.lambdify(s, args[0], "mpmath"), [sp.N(lo, digits), sp.N(hi, digits)]),
                            digits)
    return sp.N(expr.replace(sp.Integral, integrate), digits)


@pytest.mark.parametrize("name", AFFINE)
def test_docstring_formulas_are_the_derived_quantities(examples, compiled, name):
    """The formula in each one-quantity docstring, read back by SymPy, equals the derived quantity.

    Both are evaluated with 30 significant digits (integrals too) at the parameter defaults and at
    eps, the middle and T. Equal expressions then agree to about 25 digits even after cancellations;
    1e-12 relative leaves room for that and still fails on any wrong formula, which is off in the
    first digits.
    """
    d = compiled(name).compiled.derivation
    p = d.program
    cls = examples[name].module.SDE
    names = {prm.name: prm.symbol for prm in p.params}
    local = {**names, "t": p.t, "pi": sp.pi, "expm1": lambda u: sp.exp(u) - 1, "log1p": lambda u: sp.log(1 + u)}
    # Formulas are written through the program's helpers, beta(t): read back with the helpers' bodies.
    arg = sp.Dummy("u")
    local.update({h.name: sp.Lambda(arg, h.body.xreplace({p.t: arg})) for h in p.helpers})
    eps, T = (sp.Float(e.subs(p.defaults), 30) for e in (p.eps, p.T))
    times = [eps, (eps + T) / 2, T]
    checked = 0
    for method, (pattern, quantity) in FORMULAS.items():
        if method in ("t_density", "t_cdf") and p.t_sampling == "uniform":
            continue  # the docstring states 1 / (T - eps) and (t - eps) / (T - eps), no derived quantity
        first = inspect.getdoc(getattr(cls, method)).splitlines()[0]
        match = re.fullmatch(pattern, first)
        assert match, f"{method}: docstring {first!r} does not state its formula as {pattern!r}"
        if match["f"] == SUMMARISED:
            continue
        stated = sp.sympify(match["f"], locals=local)
        derived = d.tables.expand(quantity(d))  # a table lookup as the formula it stands for
        for t in times:
            got = value(stated.subs(p.defaults).subs(p.t, t))
            want = value(derived.subs(p.defaults).subs(p.t, t))
            assert abs(got - want) <= 1e-12 * abs(want) + 1e-30, (
                f"{method} at t = {t}: the docstring's {match['f']} gives {got}, the derivation {want}")
        checked += 1
    assert checked >= 5, "most formulas were skipped"


# --- (f) constructor defaults are the source's ----------------------------------------------------

@pytest.mark.parametrize("name", EXAMPLES)
def test_constructor_defaults_are_the_sources(all_examples, compiled, name):
    """SDE(...) takes the declared parameters in source order with their defaults, then N = steps."""
    program = compiled(name).compiled.derivation.program
    signature = inspect.signature(all_examples[name].module.SDE)
    got = [(q.name, q.default, q.kind) for q in signature.parameters.values()]
    want = [(prm.name, float(prm.default), inspect.Parameter.POSITIONAL_OR_KEYWORD) for prm in program.params]
    want.append(("N", program.N, inspect.Parameter.POSITIONAL_OR_KEYWORD))
    assert got == want
    assert all(type(q.default) is float for q in list(signature.parameters.values())[:-1])
    sde = all_examples[name].module.SDE()
    assert {prm.name: getattr(sde, prm.name) for prm in program.params} == {
        prm.name: float(prm.default) for prm in program.params}
