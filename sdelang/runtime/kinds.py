"""The three kinds of generated module, for the runtime: "affine", "coupled" and "general".

Every module says its kind in `kind` and what it cannot do in `unavailable` (feature -> reason);
modules compiled before kinds existed are affine.
"""
from __future__ import annotations

import re


def kind_of(sde) -> str:
    """The module's kind: "affine", "coupled" or "general" ("affine" for modules without the attribute)."""
    return getattr(sde, "kind", "affine")


def state_shape(sde, data_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of one state sample for data samples of shape [C, ...]: [K C, ...] for a coupled SDE
    (its K components stacked along the first axis, as `sde.join` does), the data's own shape otherwise."""
    data_shape = tuple(data_shape)
    if kind_of(sde) != "coupled":
        return data_shape
    if not data_shape:
        raise ValueError("a coupled SDE stacks its components along the first axis of a sample; "
                         "give data samples at least one axis, e.g. [d]")
    return (len(sde.components) * data_shape[0],) + data_shape[1:]


def unavailable_reason(sde, *features: str) -> str:
    """Why the module lacks a feature: the reason its `unavailable` dict gives under the first key that
    names one of `features` as a word (keys may list several, e.g. "exact-kernel samplers (ancestral, ...)")."""
    unavailable = getattr(sde, "unavailable", None) or {}
    for feature in features:
        for key, reason in unavailable.items():
            if feature in re.findall(r"\w+", key):
                return reason
    return "it has no scalar Gaussian transition kernel"
