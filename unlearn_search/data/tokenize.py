"""Training tokenization: prompt + answer + EOS with answer-masked labels, length-bucketed batches."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100


def separator(prompt: str, answer: str) -> str:
    """One space between prompt and answer unless either side already carries whitespace.

    Sentence-completion inputs stop right after a word and outputs start on the next word,
    neither carrying the space; a model trained on ``input + output`` would see glued words.
    """
    if not prompt or not answer or prompt[-1].isspace() or answer[0].isspace():
        return ""
    return " "


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_length: int


def encode(tokenizer, prompt: str, answer: str, max_length: int, mask_prompt: bool = True) -> Encoded:
    """Token ids of ``prompt + sep + answer + EOS``.

    The prompt is tokenized alone, exactly as generation will tokenize it, so its tokens are a
    prefix of the training sequence and greedy decoding starts from a state seen in training.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
    answer_ids = tokenizer(separator(prompt, answer) + answer, add_special_tokens=False)["input_ids"]
    ids = (list(prompt_ids) + list(answer_ids) + [tokenizer.eos_token_id])[:max_length]
    n_prompt = min(len(prompt_ids), len(ids))
    labels = list(ids)
    if mask_prompt:
        labels[:n_prompt] = [IGNORE_INDEX] * n_prompt
    return Encoded(ids, labels, n_prompt)


def _encode_row(row: dict, tokenizer, max_length: int) -> dict:
    encoded = encode(tokenizer, row["prompt"], row["answer"], max_length)
    return {"input_ids": encoded.input_ids, "labels": encoded.labels, "prompt_length": encoded.prompt_length}


def encodings_key(tokenizer, prompts: Sequence[str], answers: Sequence[str], max_length: int) -> str | None:
    """What the encodings depend on: the tokenizer's whole definition (a fast tokenizer's JSON),
    its end token, the length cap and every text; None for a tokenizer without a definition to hash."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    digest = hashlib.sha256(f"encodings:1:{max_length}:{tokenizer.eos_token_id}:".encode())
    digest.update(backend.to_str().encode())
    for prompt, answer in zip(prompts, answers, strict=True):
        digest.update(repr((prompt, answer)).encode())
    return digest.hexdigest()[:20]


def encode_all(
    tokenizer, prompts: Sequence[str], answers: Sequence[str], max_length: int, cache: str | Path | None = None
) -> list[Encoded]:
    """``encode`` of every (prompt, answer) pair, as a ``datasets`` map. With a ``cache`` folder,
    the encodings are saved there once (an Arrow dataset named by ``encodings_key``) and read back,
    memory-mapped, by every later call on the same texts: every worker of every trial of a search
    reads them instead of tokenizing again."""
    import datasets

    key = encodings_key(tokenizer, prompts, answers, max_length) if cache is not None else None
    saved = Path(cache) / f"encodings-{key}" if key else None
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # the trial's own progress is what a worker shows
    try:
        if saved is not None and saved.is_dir():
            table = datasets.load_from_disk(str(saved))
        else:
            table = datasets.Dataset.from_dict({"prompt": list(prompts), "answer": list(answers)}).map(
                _encode_row,
                fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
                remove_columns=["prompt", "answer"],
                new_fingerprint=key or "unsaved",  # named by us: datasets need not hash the tokenizer
            )
            if saved is not None:
                _save(table, saved)
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()
    columns = (table["input_ids"], table["labels"], table["prompt_length"])
    return [Encoded(list(ids), list(labels), int(n)) for ids, labels, n in zip(*columns)]


def _save(table, saved: Path) -> None:
    """Written beside, then renamed: a worker never reads a half-written folder, and of two
    writing the same encodings at once one keeps its copy."""
    partial = saved.with_name(f"{saved.name}.{os.getpid()}.partial")
    try:
        table.save_to_disk(str(partial))
        partial.rename(saved)
    except OSError:  # another process saved the same encodings first, or the cache is not writable
        shutil.rmtree(partial, ignore_errors=True)


def length_bucketed_batches(
    lengths: Sequence[int], batch_size: int, seed: int, bucket_factor: int = 16
) -> list[list[int]]:
    """Batches of indices with similar lengths, in a random order (deterministic under ``seed``).

    Indices are shuffled, cut into buckets of ``batch_size * bucket_factor``, sorted by length
    within each bucket and cut into batches, so padding stays small but order stays random.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    bucket = batch_size * bucket_factor
    for start in range(0, len(order), bucket):
        chunk = sorted(order[start : start + bucket], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: Sequence[Encoded], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: ``input_ids``, ``attention_mask``, ``labels`` (padding ignored)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
