"""The SemEval-2025 Task 4 / LUME unlearning data: forget and retain items.

A directory holds ``forget_<split>.parquet|jsonl`` and ``retain_<split>.parquet|jsonl`` with
columns ``id, input, output, task`` (``split`` optional). Each item is either sentence
completion (``sc``, regurgitation) or question answering (``qa``, knowledge).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from unlearn_search.errors import UnlearnSearchError

SETS = ("forget", "retain")
SPLITS = ("train", "validation")
TASKS = ("Task1", "Task2", "Task3")
KINDS = ("sc", "qa")
REQUIRED_COLUMNS = ("id", "input", "output", "task")


@dataclass(frozen=True)
class Item:
    id: str
    input: str
    output: str
    task: str
    set: str  # "forget" or "retain"
    split: str  # "train" or "validation"

    @property
    def kind(self) -> str:
        return item_kind(self.id)

    @property
    def document_id(self) -> str:
        """The id of the document the item was made from (MIA documents share it)."""
        return self.id[:-1][:-2].strip('"')


def item_kind(item_id: str) -> str:
    """``sc`` or ``qa``, decided exactly as the official scorer does: ``id[:-1][-2:]``."""
    kind = str(item_id)[:-1][-2:]
    if kind not in KINDS:
        raise UnlearnSearchError(
            f"item id {item_id!r}: expected it to end in 'sc<N>' (sentence completion) or 'qa<N>' (question answering)"
        )
    return kind


def read_table(path: Path) -> pd.DataFrame:
    """A parquet or JSON-lines file as a DataFrame, with a clear error if unreadable."""
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        with path.open() as handle:
            return pd.DataFrame([json.loads(line) for line in handle if line.strip()])
    except (OSError, ValueError) as error:
        raise UnlearnSearchError(f"{path}: cannot be read ({error})") from error


def find_file(directory: Path, stem: str) -> Path:
    for suffix in (".parquet", ".jsonl"):
        candidate = directory / f"{stem}{suffix}"
        if candidate.exists():
            return candidate
    raise UnlearnSearchError(f"{directory}: missing {stem}.parquet or {stem}.jsonl (expected the SemEval/LUME layout)")


def load_set(directory: Path, set_name: str, split: str) -> list[Item]:
    """All items of one set (``forget``/``retain``) and one split from ``directory``."""
    if set_name not in SETS:
        raise UnlearnSearchError(f"set {set_name!r}: expected one of {', '.join(SETS)}")
    if split not in SPLITS:
        raise UnlearnSearchError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    path = find_file(Path(directory), f"{set_name}_{split}")
    frame = read_table(path)
    if frame.empty:
        raise UnlearnSearchError(f"{path}: no rows (expected at least one item)")
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise UnlearnSearchError(
            f"{path}: missing column {', '.join(missing)} (expected columns {', '.join(REQUIRED_COLUMNS)})"
        )
    items = []
    for row in frame.itertuples(index=False):
        item_id = str(row.id)
        try:
            item_kind(item_id)
        except UnlearnSearchError as error:
            raise UnlearnSearchError(f"{path}: {error}") from None
        items.append(Item(item_id, str(row.input), str(row.output), str(row.task), set_name, split))
    check_unique(items, str(path))
    return items


def check_unique(items: Sequence[Item], where: str) -> None:
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise UnlearnSearchError(f"{where}: duplicate id {item.id!r} (expected unique ids)")
        seen.add(item.id)


def split_names(split: str) -> tuple[str, ...]:
    """``train``, ``validation`` or ``all`` (both) as a tuple of split names."""
    if split == "all":
        return SPLITS
    if split not in SPLITS:
        raise UnlearnSearchError(f"split {split!r}: expected train, validation or all")
    return (split,)


@dataclass(frozen=True)
class Benchmark:
    """The forget and retain items of one or both splits."""

    forget: tuple[Item, ...]
    retain: tuple[Item, ...]

    def restricted(self, ids: Iterable[str]) -> Benchmark:
        keep = set(ids)
        return Benchmark(tuple(i for i in self.forget if i.id in keep), tuple(i for i in self.retain if i.id in keep))


def load_benchmark(directory: str | Path, split: str = "train") -> Benchmark:
    """Forget and retain items of ``split`` (``train``, ``validation`` or ``all``)."""
    directory = Path(directory)
    forget: list[Item] = []
    retain: list[Item] = []
    for name in split_names(split):
        forget += load_set(directory, "forget", name)
        retain += load_set(directory, "retain", name)
    check_unique(forget, f"{directory} forget set")
    check_unique(retain, f"{directory} retain set")
    both = {i.id for i in forget} & {i.id for i in retain}
    if both:
        raise UnlearnSearchError(
            f"{directory}: id {sorted(both)[0]!r} is in both the forget and the retain set (expected disjoint sets)"
        )
    return Benchmark(tuple(forget), tuple(retain))
