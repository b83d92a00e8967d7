"""The original model's NLL of each MIA document: the reference attack's baseline.

Scored once per checkpoint, documents and dtype, and kept in the user cache, so that a trial's
evaluations read it rather than loading the original a second time (for a 7B model, 14 GB more on
the accelerator). A search whose objective or constraints name a reference metric scores it
before its first trial (``search.driver``), for the trials' boundary estimates.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from unlearn_search.data import DataPaths
from unlearn_search.data.locate import cache_lock, cache_root

CACHE_DIR = "original_mia_nll"


def cache_path(original_dir: str | Path, paths: DataPaths, config, device: str | None = None) -> Path:
    """Where the original's document NLLs for ``config``'s MIA split and dtype are kept."""
    from unlearn_search.models import checkpoint_digest
    from unlearn_search.models.loading import resolve_dtype

    digest = hashlib.sha256()
    checkpoint_digest(original_dir, digest)
    dtype = str(resolve_dtype(config.dtype, device)).removeprefix("torch.")
    digest.update(json.dumps([str(Path(paths.benchmark).resolve()), config.mia_split, dtype]).encode())
    return cache_root() / CACHE_DIR / f"{digest.hexdigest()[:24]}.json"


def cached_original_nll(original_dir, paths: DataPaths, config, device: str | None = None) -> dict[str, float] | None:
    """The kept NLLs, or None when none are kept (or the file is damaged)."""
    path = cache_path(original_dir, paths, config, device)
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError):
        return None


def original_nll(original_dir, paths: DataPaths, config) -> dict[str, float]:
    """The original's mean NLL of every MIA document of ``config``'s split (members and
    non-members of its item subset), by id, on this process's device in ``config.dtype``: the
    kept ones, else scored now (one pass over the documents) and kept."""
    from unlearn_search.evaluation.evaluate import load_eval_data
    from unlearn_search.evaluation.inference import document_nll
    from unlearn_search.models import load_model, load_tokenizer, read_target_manifest
    from unlearn_search.models.loading import default_device

    kept = cached_original_nll(original_dir, paths, config)
    if kept is not None:
        return kept
    path = cache_path(original_dir, paths, config)
    with cache_lock(path, "the original's MIA document NLLs"):
        kept = cached_original_nll(original_dir, paths, config)
        if kept is not None:
            return kept
        data = load_eval_data(paths, config, read_target_manifest(original_dir))
        model, tokenizer = load_model(original_dir, config.dtype, device=default_device()), load_tokenizer(original_dir)
        scored = {}
        # Members and non-members apart, in the evaluation's batches: the original scored as a
        # student gets the very same NLLs, so its reference scores tie at 0 (AUC 0.5).
        for documents in (data.members, data.nonmembers):
            nll = document_nll(model, tokenizer, [d.text for d in documents], config.batch_size)
            scored.update((d.id, value) for d, value in zip(documents, nll))
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(scored))
        partial.replace(path)  # whole or not at all
        return scored
