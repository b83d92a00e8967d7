"""MMLU in its original CSV layout: ``<split>/<subject>_<split>.csv``, no header."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from unlearn_search.errors import UnlearnSearchError

CHOICES = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # one of CHOICES


def subjects(directory: str | Path, split: str = "test") -> list[str]:
    folder = Path(directory) / split
    if not folder.is_dir():
        raise UnlearnSearchError(f"{folder}: MMLU folder not found (expected dev/, val/, test/ with CSVs)")
    names = sorted(p.name[: -len(f"_{split}.csv")] for p in folder.glob(f"*_{split}.csv"))
    if not names:
        raise UnlearnSearchError(f"{folder}: no <subject>_{split}.csv files")
    return names


def load_questions(directory: str | Path, subject: str, split: str, limit: int | None = None) -> list[Question]:
    """The first ``limit`` questions of one subject (deterministic: file order)."""
    if limit is not None and limit < 1:
        raise UnlearnSearchError(f"MMLU limit {limit}: expected at least 1 question per subject (or no limit)")
    path = Path(directory) / split / f"{subject}_{split}.csv"
    if not path.exists():
        raise UnlearnSearchError(f"{path}: MMLU file not found")
    questions = []
    with path.open(newline="", encoding="utf-8") as handle:
        for line_number, row in enumerate(csv.reader(handle), start=1):
            if len(row) != 6 or row[5].strip() not in CHOICES:
                raise UnlearnSearchError(
                    f"{path}:{line_number}: expected 6 columns (question, A, B, C, D, answer letter A-D)"
                )
            questions.append(Question(subject, row[0], (row[1], row[2], row[3], row[4]), row[5].strip()))
            if limit is not None and len(questions) >= limit:
                break
    return questions


def load_mmlu(directory: str | Path, split: str = "test", limit_per_subject: int | None = None) -> list[Question]:
    """Every subject's questions, optionally the first ``limit_per_subject`` of each."""
    questions: list[Question] = []
    for subject in subjects(directory, split):
        questions += load_questions(directory, subject, split, limit_per_subject)
    return questions
