"""A trial's settings: one flat namespace shared by the CLI, the YAML spaces and MLflow params."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from unlearn_search.errors import UnlearnSearchError
from unlearn_search.methods import METHODS, SCHEDULES, get_method, get_schedule
from unlearn_search.models.trainable import TRAINABLE


@dataclass(frozen=True)
class TrialConfig:
    method: str = "gd"
    schedule: str = "joint"
    lr: float = 1e-4
    epochs: int = 1
    batch_size: int = 8
    max_length: int = 512
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    forget_loss_bound: float | None = None
    trainable: str = "full"
    last_k: int = 8
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    train_split: str = "train"
    refusals: str | None = None
    teacher: str = "live"  # live: a frozen ZeRO-3 teacher on the workers; cached: its outputs, computed once
    teacher_top_k: int | None = None  # cached teacher: None picks full log-probs for small vocabularies
    seed: int = 0
    method_params: dict[str, Any] = field(default_factory=dict)
    schedule_params: dict[str, Any] = field(default_factory=dict)

    def flat(self) -> dict[str, Any]:
        """Every setting under its own name, as logged and as written in search spaces."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("method_params", "schedule_params")}
        return {**values, **get_method(self.method, **self.method_params).params,
                **get_schedule(self.schedule, **self.schedule_params).params}


TRIAL_FIELDS = {f.name: f for f in dataclasses.fields(TrialConfig) if f.name not in ("method_params", "schedule_params")}


def _coerce(name: str, value: Any, default: Any) -> Any:
    if default is None or value is None or isinstance(default, str):
        return value
    if isinstance(default, bool):
        return bool(value)
    try:
        return type(default)(value) if not isinstance(default, float) else float(value)
    except (TypeError, ValueError):
        raise UnlearnSearchError(f"{name}={value!r}: expected {type(default).__name__}") from None


def trial_config(settings: dict[str, Any]) -> TrialConfig:
    """Split flat settings into the trial's own fields and its method's and schedule's knobs."""
    method = settings.get("method", TrialConfig.method)
    schedule = settings.get("schedule", TrialConfig.schedule)
    if method not in METHODS:
        raise UnlearnSearchError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    if schedule not in SCHEDULES:
        raise UnlearnSearchError(f"schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    method_knobs = {k.name: k.default for k in METHODS[method].knobs}
    schedule_knobs = {k.name: k.default for k in SCHEDULES[schedule].knobs}
    own, method_params, schedule_params = {}, {}, {}
    for name, value in settings.items():
        if name in TRIAL_FIELDS:
            own[name] = _coerce(name, value, TRIAL_FIELDS[name].default)
        elif name in method_knobs:
            method_params[name] = _coerce(name, value, method_knobs[name])
        elif name in schedule_knobs:
            schedule_params[name] = _coerce(name, value, schedule_knobs[name])
        else:
            known = sorted(set(TRIAL_FIELDS) | set(method_knobs) | set(schedule_knobs))
            raise UnlearnSearchError(f"setting {name!r} is not known for method {method} with schedule {schedule} "
                                     f"(expected one of {', '.join(known)})")
    config = TrialConfig(**own, method_params=method_params, schedule_params=schedule_params)
    if config.trainable not in TRAINABLE:
        raise UnlearnSearchError(f"trainable {config.trainable!r}: expected one of {', '.join(TRAINABLE)}")
    if config.teacher not in ("live", "cached"):
        raise UnlearnSearchError(f"teacher {config.teacher!r}: expected live or cached")
    if config.teacher_top_k is not None and config.teacher_top_k < 1:
        raise UnlearnSearchError(f"teacher_top_k={config.teacher_top_k}: expected a positive integer or null (auto)")
    if config.lr <= 0 or config.epochs < 1 or config.batch_size < 1:
        raise UnlearnSearchError("lr, epochs and batch_size: expected positive values")
    get_method(method, **method_params)
    get_schedule(schedule, **schedule_params)
    if SCHEDULES[schedule].needs_retain and not METHODS[method].needs_retain:
        raise UnlearnSearchError(f"schedule {schedule} needs a method with a retain term; {method} has none "
                                 f"(expected one of {', '.join(n for n, m in METHODS.items() if m.needs_retain)})")
    return config


def parse_assignments(pairs: list[str], option: str = "--set") -> dict[str, Any]:
    """``key=value`` strings (from ``--set``, ``--resources``) with values read as YAML scalars."""
    import yaml

    settings = {}
    for pair in pairs:
        if "=" not in pair:
            raise UnlearnSearchError(f"{option} {pair!r}: expected key=value")
        key, value = pair.split("=", 1)
        settings[key.strip()] = yaml.safe_load(value)
    return settings
