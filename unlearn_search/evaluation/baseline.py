"""The original model's MMLU: the baseline the utility threshold holds a student against.

It must be the original's score on the student's own questions (the same subjects, count and
shots), and scoring a 7B on all of MMLU takes minutes, so there is one figure per checkpoint,
shots and set of questions, found in this order: a search's output (``original_mmlu.json``, so
``--resume`` and the export retry read it), the target's own report (``target build`` scored
it), the user cache (shared by every search and trial of that checkpoint), and only then scored,
once, under a lock that makes a search started beside this one wait for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

ORIGINAL_MMLU_FILE = "original_mmlu.json"


def reported_mmlu(model_dir: str | Path, data_root: str | Path, shots: int, limit: int | None) -> float | None:
    """The target's MMLU from its own report (``unlearn-search target build``) when that scored
    these questions with these shots; None otherwise."""
    from unlearn_search.data.locate import paths_from_root
    from unlearn_search.data.mmlu import load_mmlu
    from unlearn_search.evaluation.evaluate import EvalConfig
    from unlearn_search.evaluation.mmlu import PROMPT_FORMAT
    from unlearn_search.models import TARGET_EVALUATION

    report = Path(model_dir) / TARGET_EVALUATION
    if not report.exists() or shots != EvalConfig().mmlu_shots:  # the shots a target build uses
        return None
    saved = json.loads(report.read_text())
    # The first n questions of each subject: the same count is the same questions.
    same = saved.get("mmlu_questions") == len(load_mmlu(paths_from_root(data_root).mmlu, "test", limit))
    same = same and saved.get("mmlu_prompt_format") == PROMPT_FORMAT
    return saved["mmlu_average"] if same else None


def score_mmlu(
    model_path: str | Path,
    data_root: str | Path,
    shots: int,
    limit: int | None,
    batch_size: int,
    dtype: str = "auto",
    progress: bool = False,
) -> float:
    """A checkpoint's MMLU average (``limit`` questions per subject, all if None), on this
    process's device in ``dtype``; ``progress`` shows a bar (all of MMLU takes minutes)."""
    from unlearn_search.data.locate import paths_from_root
    from unlearn_search.evaluation.mmlu import evaluate_mmlu
    from unlearn_search.models import load_model, load_tokenizer
    from unlearn_search.models.loading import default_device

    model = load_model(model_path, dtype, device=default_device())
    tokenizer = load_tokenizer(model_path)
    mmlu = paths_from_root(data_root).mmlu
    return evaluate_mmlu(model, tokenizer, mmlu, shots, limit, batch_size, progress)["average"]


def baseline_key(model_dir: str | Path, data_root: str | Path, shots: int, limit: int | None) -> dict:
    """What the figure depends on: the checkpoint's files, the data, the shots, the questions and
    the prompt. No batch size: prompts are length-sorted and padded with matching position ids,
    so it moves the score by float rounding at most, and a new one should not cost a rescoring."""
    from unlearn_search.evaluation.mmlu import PROMPT_FORMAT
    from unlearn_search.models import checkpoint_digest

    digest = hashlib.sha256()
    checkpoint_digest(model_dir, digest)
    return {
        "model": str(model_dir),
        "checkpoint": digest.hexdigest()[:16],
        "data": str(data_root),
        "shots": shots,
        "limit": limit,
        "prompt_format": PROMPT_FORMAT,
    }


def original_mmlu(
    model_dir: str | Path,
    data_root: str | Path,
    evaluation,
    kept: Path | None = None,
    score: Callable[[], float] | None = None,
) -> float:
    """The original's MMLU on ``evaluation``'s questions and shots (an ``EvalConfig``): ``kept``'s
    (a search's output folder), its report's, the user cache's, else ``score()`` (default:
    ``score_mmlu`` in this process, with a progress bar), kept in the user cache and ``kept``."""
    from unlearn_search.data.locate import cache_lock, cache_root

    shots, limit = evaluation.mmlu_shots, evaluation.mmlu_limit
    key = baseline_key(model_dir, data_root, shots, limit)
    here = Path(kept) / ORIGINAL_MMLU_FILE if kept is not None else None
    shared = cache_root() / ORIGINAL_MMLU_FILE
    entry = _find(here, key) if here is not None else None
    if entry is None:
        reported = reported_mmlu(model_dir, data_root, shots, limit)
        if reported is not None:  # read again each time, so not in the user cache
            entry = {"key": key, "mmlu_average": reported}
    if entry is None:
        with cache_lock(shared, "the original's MMLU"):  # a search started beside this one scores it once
            entry = _find(shared, key)
            if entry is None:
                questions = f"{limit} per subject" if limit else "all questions"
                print(f"scoring {Path(model_dir).name} on MMLU ({questions}), once per model and set of questions")
                if score is None:
                    e = evaluation
                    value = score_mmlu(model_dir, data_root, shots, limit, e.batch_size, e.dtype, progress=True)
                else:
                    value = score()
                entry = {"key": key, "mmlu_average": value}
                _keep(shared, entry)
        if here is not None:
            _keep(here, entry)  # written only when new to this output
    return entry["mmlu_average"]


def _entries(path: Path) -> list[dict]:
    try:
        saved = json.loads(path.read_text()) if path.exists() else []
    except (OSError, ValueError):  # a damaged cache costs a rescoring, never the run
        return []
    return [saved] if isinstance(saved, dict) else saved  # one entry, as earlier versions wrote it


def _find(path: Path, key: dict) -> dict | None:
    return next((e for e in _entries(path) if e.get("key") == key), None)


def _keep(path: Path, entry: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps([e for e in _entries(path) if e.get("key") != entry["key"]] + [entry], indent=2))
        partial.replace(path)  # whole or not at all
    except OSError as error:
        logger.warning("could not write %s (%s); the original's MMLU will be scored again next time", path, error)
