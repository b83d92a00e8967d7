"""Batched greedy generation and batched negative log-likelihoods."""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm


def _batches(order: Sequence[int], size: int):
    for start in range(0, len(order), size):
        yield list(order[start:start + size])


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 256, batch_size: int = 32,
             progress: bool = False, expected_tokens: Sequence[int] | None = None,
             prompt_ids: Sequence[Sequence[int]] | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` (decoded, special tokens skipped).

    Rows are left-padded, the KV cache is on and each row stops at EOS, but a batch runs until
    its longest row is done: so rows are grouped by ``expected_tokens`` (the reference answer's
    length, when known) and then by prompt length, and a batch of short QA answers is not held
    for a 256-token completion. The order changes no output. ``batch_size=1`` is the official
    one-at-a-time procedure. ``prompt_ids``, when the caller has them, are ``prompts`` tokenized.
    """
    # One call: the fast tokenizer encodes in bulk.
    encoded = prompt_ids if prompt_ids is not None else tokenizer(list(prompts))["input_ids"]
    if expected_tokens is None:
        expected_tokens = [0] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: (min(expected_tokens[i], max_new_tokens), len(encoded[i])))
    outputs: list[str] = [""] * len(prompts)
    pad = tokenizer.pad_token_id
    for rows in tqdm(list(_batches(order, batch_size)), desc="generating", disable=not progress):
        width = max(len(encoded[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids = encoded[i]
            input_ids[r, width - len(ids):] = torch.tensor(ids)
            attention_mask[r, width - len(ids):] = 1
        generated = model.generate(
            input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
            max_new_tokens=max_new_tokens, do_sample=False, use_cache=True, pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        for i, text in zip(rows, texts):
            outputs[i] = text
    return outputs


@torch.no_grad()
def sequence_nll(model, sequences: Sequence[Sequence[int]], starts: Sequence[int], pad_token_id: int,
                 batch_size: int = 32, progress: bool = False) -> list[float]:
    """Mean token NLL of ``sequences[i][starts[i]:]`` given what precedes it, batched.

    ``starts[i]`` is the first scored token (at least 1: the first token has no context).
    """
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    result = [float("nan")] * len(sequences)
    for rows in tqdm(list(_batches(order, batch_size)), desc="scoring", disable=not progress):
        width = max(len(sequences[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        scored = torch.zeros((len(rows), width), dtype=torch.bool)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids = sequences[i]
            input_ids[r, :len(ids)] = torch.tensor(ids)
            attention_mask[r, :len(ids)] = 1
            scored[r, max(1, starts[i]):len(ids)] = True
        logits = model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device)).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        token_nll = -logprobs.gather(-1, input_ids[:, 1:, None].to(logits.device))[..., 0].cpu()
        mask = scored[:, 1:]
        per_row = (token_nll * mask).sum(1) / mask.sum(1).clamp(min=1)
        for r, i in enumerate(rows):
            result[i] = per_row[r].item() if mask[r].any() else float("nan")
    return result


def max_length(model, tokenizer) -> int:
    """The longest sequence the model takes (its position limit, else the tokenizer's)."""
    limit = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    return int(min(limit, 1 << 20))


def encode_answers(tokenizer, prompts: Sequence[str], answers: Sequence[str],
                   limit: int) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each prompt and of the official ``input + output`` concatenation (cut at
    ``limit``), one bulk call each; the answer is scored from ``len(prompt_ids[i])`` on."""
    prompt_ids = tokenizer(list(prompts))["input_ids"]
    joined = tokenizer([p + a for p, a in zip(prompts, answers)])["input_ids"]
    return prompt_ids, [ids[:limit] for ids in joined]


def answer_nll(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 32) -> list[float]:
    """Mean NLL of each answer given its prompt, over the official ``input + output`` concatenation."""
    prompt_ids, sequences = encode_answers(tokenizer, prompts, answers, max_length(model, tokenizer))
    return sequence_nll(model, sequences, [len(ids) for ids in prompt_ids], tokenizer.pad_token_id, batch_size)


def document_nll(model, tokenizer, documents: Sequence[str], batch_size: int = 16) -> list[float]:
    """Mean token NLL of whole documents (truncated to the model's length limit), for MIA."""
    limit = max_length(model, tokenizer)
    sequences = [ids[:limit] for ids in tokenizer(list(documents))["input_ids"]]
    return sequence_nll(model, sequences, [1] * len(sequences), tokenizer.pad_token_id, batch_size)
