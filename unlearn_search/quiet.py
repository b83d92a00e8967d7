"""Known third-party warnings, log lines and prints that tell our users nothing, silenced by
name; every other warning, log line and print, ours included, still shows.

Each entry names where the warning comes from and why it is safe to hide. The filters are set in
the driver (``cli.main``) and in every Ray worker and task (``training.trial._worker_environment``),
since each is its own process. A known print is dropped from stdout around the call that prints
it (``known_prints_dropped``; the job turns Ray Train's print patch off, so a worker's prints stay
prints: ``training.cluster.WORKER_ENV``). ``tests/test_quiet.py`` raises each from its real
source, so an entry whose text changes upstream fails there.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import warnings
from collections.abc import Iterator
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


@dataclass(frozen=True)
class KnownLogLine:
    source: str  # who logs it, and when
    why: str  # why a user need not see it
    logger: str  # the logger's name, or FILE_OF + a module whose logger is named by its file
    message: str  # a regular expression the whole record's text must match

    def logger_name(self) -> str:
        if not self.logger.startswith(FILE_OF):
            return self.logger
        import importlib.util
        from pathlib import Path

        # From the top-level package's folder: finding the module's own spec would import its
        # parent packages (ray.train: 2 s) in every process this runs in, a Ray task's included.
        top, *inner = self.logger.removeprefix(FILE_OF).split(".")
        spec = importlib.util.find_spec(top)
        if spec is None or spec.origin is None:
            return self.logger
        return str(Path(spec.origin).parent.joinpath(*inner).with_suffix(".py"))


FILE_OF = "the file of "  # a logger made by logging.getLogger(__file__)


KNOWN_LOG_LINES = (
    KnownLogLine(
        "Ray Tune's ResultGrid, reading back a trial that left neither result.json nor progress.csv",
        "a trial cut before Tune wrote them (the time budget ended the search as it started, or an "
        "interrupt): the search's own table lists it as stopped, and the per-report dataframe that "
        "the warning says is missing is not read by the search. Any other failure still shows",
        "ray.tune.analysis.experiment_analysis",
        r"Failed to fetch metrics for \d+ trial\(s\):"
        r"(\n- [^\n]*: FileNotFoundError\('Could not fetch metrics for [^\n]*)+",
    ),
    KnownLogLine(
        "Ray Train, in each worker, at every checkpoint a report carries",
        "the trial's own progress line says where it is; the checkpoints are the trial's to keep or drop",
        "ray.train.v2._internal.execution.storage",
        r"Checkpoint successfully created at: Checkpoint\(filesystem=[^\n]*\)",
    ),
    KnownLogLine(
        "Ray Train, in each worker, at every report (each boundary's metrics)",
        "the repr of what the worker reported, once per rank; the trial's own line and MLflow show the metrics",
        FILE_OF + "ray.train.v2._internal.execution.context",
        r"Reporting training result \d+: TrainingReport\(.*\) from rank \d+",
    ),
    KnownLogLine(
        "Ray Train's placement-group cleaner (a detached actor per trial), every second, where Ray's "
        "state API is absent: a local instance started without its dashboard (the `trial` command)",
        "it keeps watching and says so each time; the trial's placement group is still removed "
        "when its controller ends, and only a controller killed outright would leave it behind",
        "ray.train.v2._internal.execution.controller.placement_group_cleaner",
        r"Failed to query Ray Train Controller actor state\. State API may be temporarily "
        r"unavailable\. Continuing to monitor\.",
    ),
    KnownLogLine(
        "DeepSpeed, on its import (transformers imports it to save a model), in a process that has no "
        "GPU and no DS_ACCELERATOR: the driver building a target or a Ray task exporting one",
        "those processes run no DeepSpeed engine, so its choice there does not matter (on a CPU head "
        "node the GPU it says it could not find is not the workers'); a trial worker's accelerator is "
        "decided from its own devices before DeepSpeed is imported (accelerator_environment)",
        "DeepSpeed",
        r"Setting accelerator to CPU\. If you have GPU or other accelerator, we were unable to detect it\.",
    ),
    KnownLogLine(
        "rouge_score, as each process builds its ROUGE scorer (once per trial worker), on absl's logger, "
        "which a Ray Train worker's INFO level shows",
        "its default tokenizer is the one the task's official scorer uses too; nothing to act on",
        "absl",
        r"Using default tokenizer\.",
    ),
)


@dataclass(frozen=True)
class KnownPrint:
    source: str  # who prints it, and on whose call
    why: str  # why a user need not see it
    message: str  # a regular expression a whole printed line must match


KNOWN_PRINTS = (
    KnownPrint(
        "DeepSpeed's torch backend, in each worker as it joins the process group (deepspeed.init_distributed)",
        "a bare print that its shared-memory all-reduce op loaded, once per worker per trial; an op "
        "that fails to load still raises",
        r"DeepSpeed deepspeed\.ops\.comm\.\w+ built successfully",
    ),
)


class _DropKnownPrints(io.TextIOBase):
    """A text stream passing every line on to ``stream`` but those ``KNOWN_PRINTS`` match."""

    def __init__(self, stream):
        super().__init__()
        self.stream, self.pending = stream, ""
        self.patterns = [re.compile(known.message) for known in KNOWN_PRINTS]

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            if not any(p.fullmatch(line) for p in self.patterns):
                self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def close_pending(self) -> None:
        if self.pending:
            self.stream.write(self.pending)
            self.pending = ""
        self.stream.flush()


@contextlib.contextmanager
def known_prints_dropped() -> Iterator[None]:
    """Within it, lines printed to stdout that ``KNOWN_PRINTS`` match are dropped; every other
    line passes as written (a partial last line too, on leaving)."""
    stream = _DropKnownPrints(sys.stdout)
    try:
        with contextlib.redirect_stdout(stream):
            yield
    finally:
        stream.close_pending()


class _DropKnownLine(logging.Filter):
    def __init__(self, message: str):
        super().__init__()
        self.pattern = re.compile(message, re.DOTALL)

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.fullmatch(record.getMessage()) is None


def silence_known_warnings() -> None:
    """Ignore each of ``KNOWN_WARNINGS`` and ``KNOWN_LOG_LINES`` in this process (idempotent:
    filters are not duplicated)."""
    for known in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=known.message, category=known.category)
    for name, message in [(line.logger_name(), line.message) for line in KNOWN_LOG_LINES]:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownLine) and f.pattern.pattern == message for f in logger.filters):
            logger.addFilter(_DropKnownLine(message))
