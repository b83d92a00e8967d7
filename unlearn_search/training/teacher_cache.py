"""The teacher-output cache: the frozen original model's outputs, computed once, shared by trials.

In a search every trial's teacher is the same frozen model, and it only ever sees the same
forget, retain and substitute-answer sequences. Its outputs on each sequence (full log-probs
when the vocabulary is small, otherwise the top-k plus the remaining mass, and always the
log-prob of every label token; for a method that reads one layer's hidden states, RMU, those
too) are computed once, stored in one file keyed by the model, the tokenizer, the sequences and
the settings, and read by every trial instead of hosting a teacher.
Causal attention with right padding makes a sequence's outputs independent of its batch, so
entries are per sequence and any batch of them can be assembled.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from unlearn_search.data.tokenize import Encoded, collate
from unlearn_search.errors import UnlearnSearchError
from unlearn_search.methods import Reference
from unlearn_search.models.loading import checkpoint_digest

FULL_VOCAB_LIMIT = 8192  # above this, top-k is the default: full log-probs would be [T, V] per sequence
DEFAULT_TOP_K = 128


def cache_key(
    model_dir: Path,
    sequences: dict[str, Sequence[Encoded]],
    top_k: int | None,
    version: str = "1",
    layer: int | None = None,
) -> str:
    """Model and tokenizer files, every token and label of every sequence, and the settings."""
    hidden = "" if layer is None else f":hidden{layer}"  # caches without hidden states keep their key
    digest = hashlib.sha256(f"teacher-cache:{version}:{top_k}{hidden}".encode())
    checkpoint_digest(model_dir, digest)
    for name in sorted(sequences):
        digest.update(name.encode())
        for example in sequences[name]:
            digest.update(repr((example.input_ids, example.labels)).encode())
    return digest.hexdigest()[:20]


@dataclass
class TeacherCache:
    """Per-sequence teacher outputs; calling it on a batch gives that batch's ``Reference``.
    ``layer``: the decoder layer whose hidden states each entry also holds (None: none)."""

    entries: dict[tuple[int, ...], dict[str, torch.Tensor]]
    top_k: int | None
    vocab_size: int
    layer: int | None = None

    def __call__(self, batch) -> Reference:
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        rows, width = input_ids.shape
        label_logprobs = torch.zeros(rows, width - 1)
        if self.top_k is None:
            # Padding positions are never scored; a uniform distribution keeps them finite.
            logprobs = torch.full((rows, width, self.vocab_size), -math.log(self.vocab_size))
        else:
            topk_ids = torch.zeros(rows, width, self.top_k, dtype=torch.long)
            topk_logprobs = torch.full((rows, width, self.top_k), -1e4)
        hidden = None
        for row in range(rows):
            n = int(mask[row].sum())
            key = tuple(input_ids[row, :n].tolist())
            entry = self.entries.get(key)
            if entry is None:
                raise UnlearnSearchError(
                    "teacher cache: a batch holds a sequence the cache was not built on "
                    "(expected the same data, tokenizer and max_length as the cache)"
                )
            label_logprobs[row, : n - 1] = entry["label_logprobs"].float()
            if self.top_k is None:
                logprobs[row, :n] = entry["logprobs"].float()
            else:
                topk_ids[row, :n] = entry["topk_ids"].long()
                topk_logprobs[row, :n] = entry["topk_logprobs"].float()
            if self.layer is not None:
                if hidden is None:  # padding positions are never scored
                    hidden = torch.zeros(rows, width, entry["hidden"].shape[-1], dtype=entry["hidden"].dtype)
                hidden[row, :n] = entry["hidden"]
        if self.top_k is None:
            return Reference(label_logprobs, logprobs=logprobs, hidden=hidden)
        return Reference(label_logprobs, topk_ids=topk_ids, topk_logprobs=topk_logprobs, hidden=hidden)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".tmp{os.getpid()}")
        saved = {"entries": self.entries, "top_k": self.top_k, "vocab_size": self.vocab_size, "layer": self.layer}
        torch.save(saved, partial)
        partial.replace(path)  # atomic: concurrent trials never read a half-written cache

    @classmethod
    def load(cls, path: Path) -> TeacherCache:
        if not Path(path).exists():
            raise UnlearnSearchError(
                f"teacher cache {path}: no such file (expected one built by the search "
                f"or by the trial before its workers start)"
            )
        # Memory-mapped: a worker reads entries from the page cache as its batches need them, and
        # the workers of a node share one copy instead of each holding the whole file privately.
        saved = torch.load(path, weights_only=True, mmap=True)
        return cls(saved["entries"], saved["top_k"], saved["vocab_size"], saved.get("layer"))


def default_top_k(vocab_size: int) -> int | None:
    return None if vocab_size <= FULL_VOCAB_LIMIT else DEFAULT_TOP_K


@torch.no_grad()
def compute_cache(
    teacher,
    sequences: dict[str, Sequence[Encoded]],
    pad_token_id: int,
    top_k: int | None,
    batch_size: int = 8,
    layer: int | None = None,
) -> TeacherCache:
    """Run the teacher once over every distinct sequence; with ``layer``, keep that decoder
    layer's hidden states too (in the teacher's dtype: at 7B, 8 KiB per token in bfloat16)."""
    from unlearn_search.models.trainable import probe_layer

    teacher.eval()
    probe = probe_layer(teacher, layer)
    if top_k is not None and top_k >= teacher.config.vocab_size:
        top_k = None  # a top-k of the whole vocabulary is the full distribution: keep it exactly
    unique: dict[tuple[int, ...], Encoded] = {}
    for examples in sequences.values():
        for example in examples:
            unique.setdefault(tuple(example.input_ids), example)
    examples = sorted(unique.values(), key=lambda e: len(e.input_ids))
    entries: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}
    vocab_size = None
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = collate(chunk, pad_token_id)
        device = next(teacher.parameters()).device
        logits = (
            teacher(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            .logits.float()
            .cpu()
        )
        vocab_size = logits.shape[-1]
        hidden = probe.take().cpu() if probe is not None else None
        reference = Reference.from_logits(logits, batch["labels"], top_k, hidden=hidden)
        for row, example in enumerate(chunk):
            n = len(example.input_ids)
            entry = {"label_logprobs": reference.label_logprobs[row, : n - 1].clone()}
            if hidden is not None:
                entry["hidden"] = hidden[row, :n].clone()
            if top_k is None:
                entry["logprobs"] = reference.logprobs[row, :n].clone()
            else:
                entry["topk_ids"] = reference.topk_ids[row, :n].to(torch.int32).clone()
                entry["topk_logprobs"] = reference.topk_logprobs[row, :n].clone()
            entries[tuple(example.input_ids)] = entry
    if probe is not None:
        probe.remove()
    return TeacherCache(entries, top_k, vocab_size or 0, layer)


def cached_sequences(data) -> dict[str, Sequence[Encoded]]:
    """The sequences a teacher is asked about: forget, retain and substitute answers."""
    sequences = {"forget": data.forget, "retain": data.retain}
    if data.alternative is not None:
        sequences["alternative"] = data.alternative
    return sequences


def ensure_cache(
    model_dir: Path,
    data,
    directory: Path,
    top_k: int | None | str = "auto",
    progress: bool = False,
    layer: int | None = None,
) -> Path:
    """The cache file for this model and data under ``directory``, computed if missing (with
    ``layer``, holding that decoder layer's hidden states too)."""
    from unlearn_search.data.locate import cache_lock
    from unlearn_search.models import load_model

    sequences = cached_sequences(data)
    if top_k == "auto":  # the config alone: no weights are loaded when the cache already exists
        from transformers import AutoConfig

        top_k = default_top_k(AutoConfig.from_pretrained(model_dir).vocab_size)
    path = Path(directory) / f"teacher-{cache_key(Path(model_dir), sequences, top_k, layer=layer)}.pt"
    if path.exists():
        return path
    with cache_lock(path, "the teacher-output cache"):
        if not path.exists():  # else built while this process waited
            teacher = load_model(model_dir)
            teacher.requires_grad_(False)
            compute_cache(teacher, sequences, data.pad_token_id, top_k, layer=layer).save(path)
    return path
