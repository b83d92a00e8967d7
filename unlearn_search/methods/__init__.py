"""Unlearning methods: losses (one module each) and schedules, in registries by name."""

from __future__ import annotations

from unlearn_search.errors import UnlearnSearchError
from unlearn_search.methods.base import Knob, LossOutput, Method, Reference, StepInputs
from unlearn_search.methods.losses.adversarial import Adversarial
from unlearn_search.methods.losses.flat import FLAT
from unlearn_search.methods.losses.ga import GradientAscent
from unlearn_search.methods.losses.ga_kl import GradientAscentKL
from unlearn_search.methods.losses.gd import GradientDifference
from unlearn_search.methods.losses.idk import IDK
from unlearn_search.methods.losses.idk_dpo import IdkDPO
from unlearn_search.methods.losses.npo import NPO
from unlearn_search.methods.losses.random_label import RandomLabel
from unlearn_search.methods.losses.rmu import RMU
from unlearn_search.methods.losses.satimp import SatImp
from unlearn_search.methods.losses.simnpo import SimNPO
from unlearn_search.methods.losses.undial import UNDIAL
from unlearn_search.methods.losses.wga import WGA
from unlearn_search.methods.schedules import AGAD, SUGD, Joint, Schedule, Step

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        GradientAscent,
        GradientDifference,
        GradientAscentKL,
        NPO,
        SimNPO,
        RandomLabel,
        IDK,
        FLAT,
        Adversarial,
        WGA,
        UNDIAL,
        SatImp,
        IdkDPO,
        RMU,
    )
}
SCHEDULES: dict[str, type[Schedule]] = {cls.name: cls for cls in (Joint, AGAD, SUGD)}


def get_method(name: str, **params) -> Method:
    if name not in METHODS:
        raise UnlearnSearchError(f"method {name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name](**params)


def get_schedule(name: str, **params) -> Schedule:
    if name not in SCHEDULES:
        raise UnlearnSearchError(f"schedule {name!r}: expected one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name](**params)


__all__ = [
    "METHODS",
    "SCHEDULES",
    "Knob",
    "LossOutput",
    "Method",
    "Reference",
    "Schedule",
    "Step",
    "StepInputs",
    "get_method",
    "get_schedule",
]
