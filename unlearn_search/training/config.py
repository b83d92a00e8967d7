"""A trial's settings: one flat namespace shared by the CLI, the YAML spaces and MLflow params."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearn_search.data.benchmark import SPLITS
from unlearn_search.errors import UnlearnSearchError, one_of
from unlearn_search.methods import METHODS, SCHEDULES, get_method, get_schedule
from unlearn_search.models.loading import DTYPES
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
    dtype: str = "auto"  # auto: bfloat16 on GPU workers, float32 on CPU ones
    keep_best: bool = False  # end with the weights of the boundary whose quick aggregate was highest
    method_params: dict[str, Any] = field(default_factory=dict)
    schedule_params: dict[str, Any] = field(default_factory=dict)

    def flat(self) -> dict[str, Any]:
        """Every setting under its own name, as logged and as written in search spaces."""
        values = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("method_params", "schedule_params")
        }
        return {
            **values,
            **get_method(self.method, **self.method_params).params,
            **get_schedule(self.schedule, **self.schedule_params).params,
        }


TEACHERS = ("live", "cached")

TRIAL_FIELDS = {
    f.name: f for f in dataclasses.fields(TrialConfig) if f.name not in ("method_params", "schedule_params")
}


_KIND_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _coerce(name: str, value: Any, kind: type) -> Any:
    """``value`` as a setting of type ``kind``; a fractional value for an integer is refused, not cut."""
    if value is None or kind is str:
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise UnlearnSearchError(f"{name}={value!r}: expected true or false")
        return value
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise UnlearnSearchError(f"{name}={value!r}: expected {_KIND_WORDS[kind]}") from None
    if not math.isfinite(number):
        raise UnlearnSearchError(f"{name}={value!r}: expected a finite number")
    if kind is int:
        if not number.is_integer():
            raise UnlearnSearchError(f"{name}={value!r}: expected an integer")
        return int(number)
    return number


def _kind(default: Any, annotation: str = "") -> type:
    if default is not None:
        return type(default)
    return {"int": int, "float": float}.get(annotation.split("|")[0].strip(), str)


FIELD_TYPES = {name: _kind(f.default, str(f.type)) for name, f in TRIAL_FIELDS.items()}
FIELD_OPTIONAL = {name for name, f in TRIAL_FIELDS.items() if "None" in str(f.type)}

# Checked once the settings are parsed: a bad value fails here, before any worker starts.
FIELD_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda v: v > 0, "a value > 0"),
    "epochs": (lambda v: v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "max_length": (lambda v: v >= 2, "an integer >= 2"),
    "max_grad_norm": (lambda v: v > 0, "a value > 0"),
    "weight_decay": (lambda v: v >= 0, "a value >= 0"),
    "forget_loss_bound": (lambda v: v is None or v > 0, "a value > 0 or null"),
    "last_k": (lambda v: v >= 1, "an integer >= 1"),
    "lora_rank": (lambda v: v >= 1, "an integer >= 1"),
    "lora_alpha": (lambda v: v > 0, "a value > 0"),
    "lora_dropout": (lambda v: 0 <= v < 1, "a value in [0, 1)"),
    "teacher_top_k": (lambda v: v is None or v >= 1, "a positive integer or null (auto)"),
}


FIELD_HELP = {
    "method": "the unlearning loss (table above)",
    "schedule": "the order and weights of forget and retain batches (table above)",
    "lr": "learning rate (AdamW)",
    "epochs": "passes over the forget set; chunked schedules make them over each chunk (SUGD: times epochs_per_chunk)",
    "batch_size": "items per optimizer step, across all of a trial's workers",
    "max_length": "tokens per item (prompt, answer and end token); longer items lose their end",
    "max_grad_norm": "gradient clipping",
    "weight_decay": "AdamW weight decay",
    "forget_loss_bound": "gradient ascent pauses while the forget cross-entropy is above it (null: never)",
    "trainable": "what is trained: every weight, LoRA adapters, or the last k decoder layers",
    "last_k": "decoder layers trained with trainable=last_k",
    "lora_rank": "LoRA rank with trainable=lora",
    "lora_alpha": "LoRA scaling numerator",
    "lora_dropout": "LoRA dropout",
    "train_split": "the benchmark split unlearned",
    "refusals": "a CSV of refusal templates (null: the data root's)",
    "teacher": "the original model's outputs: a frozen ZeRO-3 copy on the workers, or the cache built once per search",
    "teacher_top_k": "log-probs kept per position in the cache (null: all for vocabularies up to 8192, else 128)",
    "seed": "data order, substitute answers, and random initialization (LoRA adapters)",
    "dtype": "what the student, the teacher and the evaluations run in: auto is bfloat16 on GPU workers "
    "(DeepSpeed bf16), float32 on CPU",
    "keep_best": "end with the weights of the schedule boundary whose quick aggregate estimate was highest "
    "(ties: the later), not the last step's",
}


def setting_values(name: str) -> str:
    """A trial field's valid values in words, as its errors say them (empty when any value goes)."""
    choices = {
        "method": tuple(METHODS),
        "schedule": tuple(SCHEDULES),
        "trainable": TRAINABLE,
        "teacher": TEACHERS,
        "train_split": SPLITS,
        "dtype": DTYPES,
    }
    if name in choices:
        return "one of " + ", ".join(choices[name])
    return FIELD_RANGES[name][1] if name in FIELD_RANGES else ""


def setting_type(name: str, method: str | None = None, schedule: str | None = None) -> type | None:
    """The type a setting takes (int, float, bool or str); None for a name nothing here knows."""
    if name in FIELD_TYPES:
        return FIELD_TYPES[name]
    for registry, key in ((METHODS, method), (SCHEDULES, schedule)):
        for knob in registry[key].knobs if key in registry else ():
            if knob.name == name:
                return _kind(knob.default)
    return None


def trial_config(settings: dict[str, Any]) -> TrialConfig:
    """Split flat settings into the trial's own fields and its method's and schedule's knobs."""
    method = settings.get("method", TrialConfig.method)
    schedule = settings.get("schedule", TrialConfig.schedule)
    for name, value in (("method", method), ("schedule", schedule)):
        if not isinstance(value, str):
            raise UnlearnSearchError(f"{name}={value!r}: expected a name")
    if method not in METHODS:
        raise UnlearnSearchError(f"method {method!r}: expected {one_of(method, METHODS)}")
    if schedule not in SCHEDULES:
        raise UnlearnSearchError(f"schedule {schedule!r}: expected {one_of(schedule, SCHEDULES)}")
    method_knobs = {k.name: k.default for k in METHODS[method].knobs}
    schedule_knobs = {k.name: k.default for k in SCHEDULES[schedule].knobs}
    own, method_params, schedule_params = {}, {}, {}
    for name, value in settings.items():
        if name in TRIAL_FIELDS:
            kind = FIELD_TYPES[name]
            if value is None and name not in FIELD_OPTIONAL:
                raise UnlearnSearchError(f"{name}=None: expected {_KIND_WORDS[kind]} (it has no null value)")
            if kind is str and value is not None and not isinstance(value, str):
                raise UnlearnSearchError(f"{name}={value!r}: expected a string")
            own[name] = _coerce(name, value, kind)
        elif name in method_knobs:
            method_params[name] = _coerce(name, value, _kind(method_knobs[name]))
        elif name in schedule_knobs:
            schedule_params[name] = _coerce(name, value, _kind(schedule_knobs[name]))
        else:
            known = sorted(set(TRIAL_FIELDS) | set(method_knobs) | set(schedule_knobs))
            raise UnlearnSearchError(
                f"setting {name!r} is not known for method {method} with schedule {schedule} "
                f"(expected {one_of(name, known)})"
            )
    config = TrialConfig(**own, method_params=method_params, schedule_params=schedule_params)
    if config.trainable not in TRAINABLE:
        raise UnlearnSearchError(f"trainable {config.trainable!r}: expected one of {', '.join(TRAINABLE)}")
    if config.teacher not in TEACHERS:
        raise UnlearnSearchError(f"teacher {config.teacher!r}: expected {' or '.join(TEACHERS)}")
    if config.dtype not in DTYPES:
        raise UnlearnSearchError(f"dtype {config.dtype!r}: expected one of {', '.join(DTYPES)}")
    if config.train_split not in SPLITS:
        raise UnlearnSearchError(f"train_split {config.train_split!r}: expected one of {', '.join(SPLITS)}")
    for name, (valid, expected) in FIELD_RANGES.items():
        if not valid(getattr(config, name)):
            raise UnlearnSearchError(f"{name}={getattr(config, name)!r}: expected {expected}")
    get_method(method, **method_params)
    get_schedule(schedule, **schedule_params)
    if SCHEDULES[schedule].needs_retain and not METHODS[method].needs_retain:
        raise UnlearnSearchError(
            f"schedule {schedule} needs a method with a retain term; {method} has none "
            f"(expected one of {', '.join(n for n, m in METHODS.items() if m.needs_retain)})"
        )
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


def check_output_dir(output: str | Path, model_dir: str | Path) -> Path:
    """``output`` resolved; refused when it is the input model's directory or holds it, since a
    run replaces ``output/model`` and its own files there."""
    output, model_dir = Path(output).resolve(), Path(model_dir).resolve()
    if output == model_dir:
        raise UnlearnSearchError(f"output {output}: is the input model directory (expected another directory)")
    if output in model_dir.parents:
        raise UnlearnSearchError(
            f"output {output}: contains the input model directory {model_dir} (expected a directory outside it)"
        )
    return output
