"""Stage 2: AST -> IR. Resolves names, inlines helpers and checks the program.

Every user mistake found here is an :class:`SdeError` pointing at the offending
expression: undefined or misspelled names, wrong arity, redefinitions, bad
settings (eps >= T, steps not a positive integer), a zero or negative
diffusion, a negative weighting, and what a kind of SDE cannot have: a general
SDE (drift not affine in x, or a diffusion g(x, t)) has no kernel, so no
importance sampling, no sigma^2 weighting and no derived prior; a coupled SDE
(several 'd<name> = ...' lines) must be linear with one time profile.

One pass per module, all working on one checker state (common.py):

    names.py        definitions, reserved and duplicate names, parameter defaults and overrides
    expressions.py  AST expressions -> SymPy (names, helpers inlined, d/dt, number ranges)
    positivity.py   the diffusion and the weighting positive, the drift finite, on [eps, T]
    coupled.py      the components of a coupled linear SDE and their shared time profile
    given.py        a process given by its kernel or logSNR, and the SDE derived from it
    program.py      the settings and the SDE line(s), in the order they are checked; builds the IR
"""
from __future__ import annotations

from ... import errors
from .. import syntax as ast
from ..ir import Program
from .common import (BUILTIN_CONSTANTS, BUILTINS, DEFAULT_EPS, DEFAULT_N, DEFAULT_T, MODULE_ATTRIBUTES, RESERVED,
                     TIME, CheckerState)
from .coupled import CoupledPass
from .expressions import ExpressionsPass
from .given import GivenPass
from .names import NamesPass
from .positivity import PositivityPass
from .program import ProgramPass

__all__ = ["check", "BUILTINS", "BUILTIN_CONSTANTS", "DEFAULT_EPS", "DEFAULT_N", "DEFAULT_T", "MODULE_ATTRIBUTES",
           "RESERVED", "TIME"]


class _Checker(ProgramPass, GivenPass, CoupledPass, PositivityPass, ExpressionsPass, NamesPass, CheckerState):
    """The passes over one state; program() runs them."""


def check(module: ast.Module, source: errors.Source, overrides: dict[str, float] | None = None) -> Program:
    """Resolve and check a parsed program, returning its IR.

    ``overrides`` replaces parameter defaults (``--param k=v``) before any check runs.
    """
    return _Checker(source, module, overrides=dict(overrides or {})).program()
