"""Known third-party warnings that tell our users nothing, silenced by name; every other warning,
ours included, still shows.

Each entry names where the warning comes from and why it is safe to hide. The filters are set in
the driver (``cli.main``) and in every Ray worker and task (``training.trial._worker_environment``),
since each is its own process. ``tests/test_quiet.py`` raises each from its real source, so an
entry whose text changes upstream fails there.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownWarning:
    source: str  # who raises it, and on whose call
    why: str  # why a user need not see it
    category: type[Warning]
    message: str  # a regular expression matched at the start of the warning's text


KNOWN_WARNINGS = (
    KnownWarning(
        "torch.distributed, on DeepSpeed's ZeRO collectives",
        "DeepSpeed's calls, not ours; printed on every worker at every gather under torch 2.13",
        FutureWarning,
        r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor|_all_gather_base"
        r"|_reduce_scatter_base)` is",
    ),
    KnownWarning(
        "transformers, on peft's check of a LoRA model",
        "peft's call of a renamed property; the behaviour is the same",
        FutureWarning,
        r"`is_gradient_checkpointing` is deprecated",
    ),
)


def silence_known_warnings() -> None:
    """Ignore each of ``KNOWN_WARNINGS`` in this process (idempotent: filters are not duplicated)."""
    for known in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=known.message, category=known.category)
