"""Training tokenization: prompt + answer + EOS with answer-masked labels, length-bucketed batches."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

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
