"""Models: loading checkpoints and building the reference target."""

from unlearn_search.models.loading import (
    TARGET_EVALUATION,
    check_model_dir,
    checkpoint_digest,
    load_model,
    load_tokenizer,
    read_target_manifest,
)
from unlearn_search.models.target import PRESETS, TargetPreset, build_target, get_preset, resolve_model

__all__ = [
    "PRESETS",
    "TARGET_EVALUATION",
    "TargetPreset",
    "build_target",
    "check_model_dir",
    "checkpoint_digest",
    "get_preset",
    "load_model",
    "load_tokenizer",
    "read_target_manifest",
    "resolve_model",
]
