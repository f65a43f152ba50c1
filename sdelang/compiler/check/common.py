"""What every pass of the checker shares: the builtins, the reserved names, the settings of the checks,
the scope an expression is lowered in, and the checker's state (the definitions found so far)."""
from __future__ import annotations

import builtins
import math
import sys
from dataclasses import dataclass, field

import sympy as sp

from .. import syntax as ast
from ...errors import SdeError, Source, Span
from ..ir import Helper
from ..parse import RESERVED_WORDS
from ..timelimit import call_with_time_limit

DEFAULT_EPS = sp.Rational(1, 100000)
DEFAULT_T = sp.Integer(1)
DEFAULT_N = 1000
# The most time steps a program or a sampler may ask for: per-step tensors must fit in memory, and more
# steps than this is a typing mistake (`steps 1e12`) rather than a plan.
MAX_STEPS = 1_000_000
# The largest float32 number: the generated modules compute in float32, so T past it is inf there.
FLOAT32_MAX = 3.4028234663852886e38

TIME = sp.Symbol("t", positive=True)
# The checker names the state after the SDE line (dx -> x); generated code always calls it x.


def _sigmoid(u):
    return 1 / (1 + sp.exp(-u))


BUILTINS = {
    "exp": sp.exp, "log": sp.log, "sqrt": sp.sqrt, "sin": sp.sin, "cos": sp.cos, "tan": sp.tan,
    "tanh": sp.tanh, "sinh": sp.sinh, "cosh": sp.cosh, "atan": sp.atan, "abs": sp.Abs, "sign": sp.sign,
    "log1p": lambda u: sp.log(1 + u), "expm1": lambda u: sp.exp(u) - 1,
    "sigmoid": _sigmoid, "softplus": lambda u: sp.log(1 + sp.exp(u)),
}
BUILTIN_CONSTANTS = {"pi": sp.pi}
# Names the checker refuses as user definitions, with the reason.
RESERVED = {"t": "the time variable", **{k: "a builtin function" for k in BUILTINS},
            "pi": "a builtin constant", **{k: "a reserved word of the language" for k in RESERVED_WORDS}}
# A parameter becomes an argument and an attribute of the generated torch module, so it cannot be
# a Python keyword or one of the module's own attributes.
MODULE_ATTRIBUTES = frozenset({
    "self", "T", "N", "eps", "kernel_path", "inverse_cdf_path", "t_sampling", "diffusion",
    "marginal_prob", "mean_coeff", "mean_offset", "std", "log_snr", "prior_sampling", "prior_logp",
    "discretize", "reverse", "weight", "t_density", "t_cdf", "t_icdf", "sample_t", "drift_divergence",
    "training", "forward", "sde", "v0", "weighting", "SDE", "math", "torch", "kind", "unavailable",
    # general and coupled modules
    "noise_gradient", "components", "data_index", "noisy", "split", "join", "data", "profile", "time_change",
    "transition", "kernel", "perturb", "noise_to_score", "init_sampling", "init_logp", "F0", "D0", "mean0",
    "Sigma0",
    # torch.nn.Module's public attributes (tests/test_programs.py checks this list against torch).
    "T_destination", "add_module", "apply", "bfloat16", "buffers", "call_super_init", "children",
    "compile", "cpu", "cuda", "double", "dump_patches", "eval", "extra_repr", "float", "get_buffer",
    "get_extra_state", "get_parameter", "get_submodule", "half", "ipu", "load_state_dict", "modules",
    "mtia", "named_buffers", "named_children", "named_modules", "named_parameters", "parameters",
    "register_backward_hook", "register_buffer", "register_forward_hook", "register_forward_pre_hook",
    "register_full_backward_hook", "register_full_backward_pre_hook", "register_load_state_dict_post_hook",
    "register_load_state_dict_pre_hook", "register_module", "register_parameter",
    "register_state_dict_post_hook", "register_state_dict_pre_hook", "requires_grad_", "set_extra_state",
    "set_submodule", "share_memory", "state_dict", "to", "to_empty", "train", "type", "xpu", "zero_grad",
}) | frozenset(dir(builtins))
# An SDE's name is a file name, <name>.py, beside other generated modules and the user's scripts: short
# enough for every file system (with the atomic writer's temporary suffix), and not the name of a module
# that they import, which the file would shadow for everything run from that folder (case-insensitively,
# as on macOS and Windows).
MAX_NAME_LENGTH = 64
SHADOWED_MODULES = frozenset(name.lower() for name in sys.stdlib_module_names) | frozenset({
    "torch", "numpy", "sympy", "scipy", "mpmath", "sdelang", "lark", "jinja2", "markupsafe", "matplotlib",
    "sklearn", "pandas", "hypothesis", "pytest", "conftest", "setuptools", "pip", "pkg_resources",
    "typing_extensions", "torchvision", "torchsde", "k_diffusion", "diffusers", "tqdm", "pil",
    "sitecustomize", "usercustomize", "setup"})
PARAM_DEFAULT_HINT = "parameter defaults are numbers; use a constant 'name = expr' for derived values"
GRID_POINTS = 257  # where positivity of g(t) and lambda(t) is checked on [eps, T]
MAX_DIGITS = 308   # exact numbers beyond float64's range are refused before SymPy expands them
STATE_RANGE = 4.0  # where a state-dependent drift or diffusion is checked, x in [-4, 4]
EVALUATE_SECONDS = 5.0  # sp.N on a constant such as exp(exp(exp(100))) would otherwise never end


@dataclass
class Scope:
    """What an expression may refer to: bound variables and the context's name."""

    bound: dict[str, sp.Expr]
    context: str                    # e.g. "the drift", "function 'beta'"
    allow_t_free: bool = False      # may it use the global t?
    derivative_var: sp.Symbol | None = None
    data: dict[str, sp.Symbol] = field(default_factory=dict)  # a kernel's mean: 'x(0)' is the data
    t_hint: str = ("only the drift, the diffusion, the weighting and helper functions "
                   "with an argument named t may use t")



@dataclass
class CheckerState:
    """The program being checked and what the passes have found so far."""

    source: Source
    module: ast.Module
    params: dict[str, ast.ParamDef] = field(default_factory=dict)
    consts: dict[str, ast.ConstDef] = field(default_factory=dict)
    functions: dict[str, ast.FunctionDef] = field(default_factory=dict)
    param_symbols: dict[str, sp.Symbol] = field(default_factory=dict)
    param_defaults: dict[str, float] = field(default_factory=dict)
    _const_values: dict[str, sp.Expr] = field(default_factory=dict)
    _function_bodies: dict[str, tuple[tuple[sp.Dummy, ...], sp.Expr]] = field(default_factory=dict)
    _in_progress: list[str] = field(default_factory=list)
    overrides: dict[str, float] = field(default_factory=dict)
    state: str | None = None        # the x of the first 'dx = ...' line
    sdes: dict[str, ast.SdeDef] = field(default_factory=dict)   # state name -> its SDE line
    inits: dict[str, ast.InitDef] = field(default_factory=dict)  # component name -> 'v(0) ~ ...'
    kernels: list[ast.KernelDef | ast.LogSnrDef] = field(default_factory=list)  # 'x(t) ~ ...', 'logsnr(t) = ...'
    _resolving: str | None = None   # the parameter whose default is being evaluated
    sampled: list[str] = field(default_factory=list)  # checks that could only sample (check/sign.py)

    def error(self, message: str, span: Span | None, hint: str | None = None) -> SdeError:
        return SdeError(message, span, self.source, hint)

    def helpers(self) -> tuple[Helper, ...]:
        """The one-argument helpers, in the order written, with their bodies in t: what code generation and
        `sdelang show` write derived expressions through (codegen/fold.py)."""
        params = set(self.param_symbols.values())
        named = []
        for name, (formals, body) in self._function_bodies.items():
            if len(formals) == 1:
                body = body.xreplace({formals[0]: TIME})
                if TIME in body.free_symbols and body != TIME and body.free_symbols <= params | {TIME}:
                    named.append(Helper(name, body, formals[0].name))
        return tuple(named)

    def _defaults(self) -> dict[sp.Symbol, float]:
        return {self.param_symbols[k]: v for k, v in self.param_defaults.items()}

    def with_defaults(self, expr: sp.Expr) -> sp.Expr:
        """expr with the parameters it uses at their defaults (the others untouched): linear in expr's size,
        not in the number of parameters, which a program may have thousands of."""
        values = {}
        for symbol in expr.free_symbols:
            name = getattr(symbol, "name", None)
            if self.param_symbols.get(name) == symbol and name in self.param_defaults:
                values[symbol] = sp.Float(self.param_defaults[name])
        return expr.xreplace(values) if values else expr

    def at_defaults(self) -> str:
        """Said after a value measured at the parameters' values: the defaults, and the --param overrides by name."""
        if not self.params:
            return ""
        given = ", ".join(f"{name} = {self.param_defaults[name]:g}" for name in self.params if name in self.overrides)
        if not given:
            return " (with the default parameters)"
        rest = " and the other parameters at their defaults" if len(self.overrides) < len(self.params) else ""
        return f" (with {given}{rest})"


DESCRIBE = {ast.Header: "the 'sde NAME' line", ast.SdeDef: "the SDE", ast.TimeDef: "the time interval",
             ast.StepsDef: "'steps'", ast.V0Def: "'v0'", ast.PriorDef: "the prior",
             ast.WeightingDef: "the weighting", ast.SamplingDef: "the t sampling"}


def names_in(expr: ast.Expr) -> set[str]:
    """The names an expression mentions, called functions included."""
    if isinstance(expr, ast.Name):
        return {expr.id}
    if isinstance(expr, ast.Call):
        return {expr.func}.union(*map(names_in, expr.args))
    if isinstance(expr, ast.BinOp):
        return names_in(expr.left) | names_in(expr.right)
    if isinstance(expr, ast.Neg):
        return names_in(expr.operand)
    if isinstance(expr, ast.Derivative):
        return names_in(expr.expr)
    return set()


def evaluate(expr: sp.Expr) -> float | None:
    """A finite real float, or None (also when the evaluation takes too long)."""
    number = call_with_time_limit(EVALUATE_SECONDS, sp.N, expr, 30)[1]  # None when out of time
    try:
        value = complex(number)
    except (TypeError, ValueError):
        return None
    if abs(value.imag) > 1e-12 * (1 + abs(value.real)) or not math.isfinite(value.real):
        return None
    return value.real
