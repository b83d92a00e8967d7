"""Where the data lives: an option, ``UNLEARN_SEARCH_DATA``, ``../shared/data``, or the user cache."""

from __future__ import annotations

import hashlib
import json
import os
import random
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from unlearn_search.errors import UnlearnSearchError

ENV_VAR = "UNLEARN_SEARCH_DATA"
LUME_URL = "https://raw.githubusercontent.com/amazon-science/lume-llm-unlearning/main/data"


def cache_root() -> Path:
    return Path(os.environ.get("UNLEARN_SEARCH_CACHE", Path.home() / ".cache" / "unlearn-search"))


@contextmanager
def cache_lock(entry: Path, what: str) -> Iterator[None]:
    """Hold ``<entry>.lock`` while a shared cache entry is built or rewritten, so that two
    searches started together build it once: the second waits (saying so), then finds it."""
    from filelock import FileLock, Timeout

    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(entry.with_name(entry.name + ".lock")))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"unlearn-search: waiting for another process building {what} ({entry})", flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@dataclass(frozen=True)
class DataPaths:
    """The three inputs, each a folder: the unlearning benchmark, MMLU, refusal templates."""

    root: Path
    benchmark: Path
    mmlu: Path
    refusals: Path


def _is_benchmark(folder: Path) -> bool:
    return any((folder / f"forget_train{s}").exists() for s in (".parquet", ".jsonl"))


def paths_from_root(root: Path) -> DataPaths:
    """A data root holds ``semeval25/``, ``mmlu/``, ``refusals/``; a benchmark folder itself also
    works, holding ``mmlu/`` and ``refusals/`` or with them beside it."""
    root = Path(root).expanduser().resolve()
    benchmark = root if _is_benchmark(root) else root / "semeval25"

    def folder(name: str) -> Path:
        inside = root / name
        return root.parent / name if benchmark == root and not inside.is_dir() else inside

    return DataPaths(root, benchmark, folder("mmlu"), folder("refusals"))


def candidate_roots(explicit: str | Path | None = None) -> list[tuple[str, Path]]:
    if explicit:
        return [("--data", Path(explicit))]
    found = []
    if os.environ.get(ENV_VAR):
        found.append((ENV_VAR, Path(os.environ[ENV_VAR])))
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        found.append(("../shared/data", base.parent / "shared" / "data"))
    found.append(("user cache", cache_root() / "data"))
    return found


def resolve_data(explicit: str | Path | None = None) -> DataPaths:
    """The first place that holds the benchmark, or one error naming every place looked at."""
    tried = []
    for label, root in candidate_roots(explicit):
        paths = paths_from_root(root)
        if _is_benchmark(paths.benchmark):
            return paths
        tried.append(f"{label} ({paths.benchmark})")
        if label == "--data":
            break
    raise UnlearnSearchError(
        f"no unlearning data found; looked in {'; '.join(tried)}: expected forget_train.parquet|jsonl; "
        f"pass --data DIR, set {ENV_VAR}, or run 'unlearn-search data fetch'"
    )


def _split_validation(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split by document so a document's sc and qa items stay together; deterministic under seed."""
    documents = sorted({str(r["id"])[:-3] for r in rows})
    random.Random(seed).shuffle(documents)
    held_out = set(documents[: round(len(documents) * fraction)])
    train = [r for r in rows if str(r["id"])[:-3] not in held_out]
    validation = [r for r in rows if str(r["id"])[:-3] in held_out]
    return train, validation


def fetch(
    url: str = LUME_URL, destination: Path | None = None, validation_fraction: float = 0.2, seed: int = 0
) -> Path:
    """Download LUME ``forget.jsonl`` and ``retain.jsonl`` and split each into train/validation."""
    destination = Path(destination or cache_root() / "data") / "semeval25"
    destination.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    for set_name in ("forget", "retain"):
        source = f"{url.rstrip('/')}/{set_name}.jsonl"
        try:
            with urllib.request.urlopen(source, timeout=60) as response:
                payload = response.read()
        except OSError as error:
            raise UnlearnSearchError(f"cannot download {source} ({error})") from error
        digest.update(payload)
        rows = [json.loads(line) for line in payload.decode("utf-8").splitlines() if line.strip()]
        for split, part in zip(("train", "validation"), _split_validation(rows, validation_fraction, seed)):
            with (destination / f"{set_name}_{split}.jsonl").open("w") as handle:
                for row in part:
                    handle.write(json.dumps(row) + "\n")
    (destination / "SOURCE").write_text(f"{url}\nsha256 {digest.hexdigest()}\n")
    return destination
