"""Batched greedy generation and batched negative log-likelihoods."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

_SHARED = contextvars.ContextVar("shared_over_ranks", default=False)


@contextlib.contextmanager
def shared_over_ranks() -> Iterator[None]:
    """Within it, every rank of the process group runs its share of each batched loop here, and
    all ranks get every result: the quick evaluation on a trial's workers, which must all enter
    it together. Under ZeRO-3 each model call is collective anyway, so without it every rank
    would compute the whole evaluation; with it, each computes 1/world of it."""
    token = _SHARED.set(True)
    try:
        yield
    finally:
        _SHARED.reset(token)


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if _SHARED.get() and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def batches_of(order: Sequence[int], size: int) -> list[list[int]]:
    """``order`` cut into consecutive batches of at most ``size`` rows. Shared over ranks, into as
    many batches as the ranks can take in equal numbers (a multiple of the ranks, each a little
    smaller than ``size`` where needed): a quick evaluation's 32 documents in one batch of 32
    would leave one of two ranks repeating it for nothing; in two of 16 each rank scores half."""
    _, world = _world()
    if world > 1 and order:
        count = world * -(-len(order) // (world * size))
        size = -(-len(order) // count)
    return [list(order[start : start + size]) for start in range(0, len(order), size)]


def dealt(batches: list[list[int]]) -> list[tuple[list[int], bool]]:
    """This rank's ``(batch, kept)`` pairs: batches dealt round-robin over the ranks, every rank
    making the same number of model calls (under ZeRO-3 each is collective); a rank short of
    batches repeats one and drops its result (``kept`` False). All batches, kept, on one process."""
    rank, world = _world()
    if world == 1 or not batches:
        return [(rows, True) for rows in batches]
    calls = -(-len(batches) // world)
    mine = [(batches[i], True) for i in range(rank, len(batches), world)]
    return mine + [(batches[0], False)] * (calls - len(mine))


def merged(results: dict[int, Any]) -> dict[int, Any]:
    """Every rank's ``{index: result}`` in one dict, on every rank (as given on one process)."""
    import torch.distributed as dist

    _, world = _world()
    if world == 1:
        return results
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, results)
    return {index: value for part in everyone for index, value in part.items()}


def eos_token_id(model, tokenizer) -> int | list[int] | None:
    """Where generation stops: the checkpoint's own ``generation_config`` EOS (one id or several),
    as the official scorer's ``generate`` uses it; the tokenizer's when the checkpoint sets none."""
    config = getattr(model, "generation_config", None)
    own = getattr(config, "eos_token_id", None)
    return own if own is not None else tokenizer.eos_token_id


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 256,
    batch_size: int = 32,
    progress: bool = False,
    expected_tokens: Sequence[int] | None = None,
    prompt_ids: Sequence[Sequence[int]] | None = None,
) -> list[str]:
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
    outputs: dict[int, str] = {}
    pad = tokenizer.pad_token_id
    for rows, kept in tqdm(dealt(batches_of(order, batch_size)), desc="generating", disable=not progress):
        width = max(len(encoded[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids = encoded[i]
            input_ids[r, width - len(ids) :] = torch.tensor(ids)
            attention_mask[r, width - len(ids) :] = 1
        generated = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad,
            eos_token_id=eos_token_id(model, tokenizer),
        )
        texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        if kept:
            outputs.update(zip(rows, texts))
    outputs = merged(outputs)
    return [outputs[i] for i in range(len(prompts))]


@dataclass(frozen=True)
class TokenStatistics:
    """One sequence's scored tokens under a model: each token's log-probability and, at its
    position, the mean and standard deviation of log p over the vocabulary under the model's own
    distribution (what min-k %++ normalizes by; None where not asked for)."""

    logprob: np.ndarray
    vocab_mean: np.ndarray | None = None
    vocab_std: np.ndarray | None = None

    @property
    def nll(self) -> float:
        return float(-self.logprob.mean()) if self.logprob.size else float("nan")


@torch.no_grad()
def token_statistics(
    model,
    sequences: Sequence[Sequence[int]],
    starts: Sequence[int],
    pad_token_id: int,
    batch_size: int = 32,
    progress: bool = False,
    vocab_moments: bool = False,
) -> list[TokenStatistics]:
    """``TokenStatistics`` of ``sequences[i][starts[i]:]`` given what precedes it, batched.

    ``starts[i]`` is the first scored token (at least 1: the first token has no context).
    ``vocab_moments``: also the vocabulary mean and spread (two more vocabulary-wide tensors).
    """
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    result: dict[int, TokenStatistics] = {}
    for rows, kept in tqdm(dealt(batches_of(order, batch_size)), desc="scoring", disable=not progress):
        width = max(len(sequences[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            input_ids[r, : len(sequences[i])] = torch.tensor(sequences[i])
            attention_mask[r, : len(sequences[i])] = 1
        logits = model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device)).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        token = logprobs.gather(-1, input_ids[:, 1:, None].to(logits.device))[..., 0].cpu().numpy()
        mean = std = None
        if vocab_moments:
            mean, std = (t.cpu().numpy() for t in _vocab_moments(logprobs))
        if kept:
            for r, i in enumerate(rows):
                scored = slice(max(1, starts[i]) - 1, len(sequences[i]) - 1)
                moments = (None, None) if mean is None else (mean[r, scored], std[r, scored])
                result[i] = TokenStatistics(token[r, scored], *moments)
    result = merged(result)
    return [result[i] for i in range(len(sequences))]


def _vocab_moments(logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``E_p[log p]`` and the standard deviation of ``log p`` under ``p`` at each position (Zhang
    et al. 2024, eq. 3), the variance clamped at 1e-6 as open-unlearning's min-k %++ does: a
    one-hot distribution has no spread."""
    probs = logprobs.exp()
    mean = (probs * logprobs).sum(-1)
    variance = (probs * logprobs.square()).sum(-1) - mean.square()
    return mean, variance.clamp(min=1e-6).sqrt()


def sequence_nll(
    model,
    sequences: Sequence[Sequence[int]],
    starts: Sequence[int],
    pad_token_id: int,
    batch_size: int = 32,
    progress: bool = False,
) -> list[float]:
    """Mean token NLL of ``sequences[i][starts[i]:]`` given what precedes it, batched (NaN for a
    sequence with no scored token)."""
    return [s.nll for s in token_statistics(model, sequences, starts, pad_token_id, batch_size, progress)]


def max_length(model, tokenizer) -> int:
    """The longest sequence the model takes (its position limit, else the tokenizer's)."""
    limit = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    return int(min(limit, 1 << 20))


def encode_answers(
    tokenizer, prompts: Sequence[str], answers: Sequence[str], limit: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each prompt and of the official ``input + output`` concatenation (cut at
    ``limit``), one bulk call each; the answer is scored from ``len(prompt_ids[i])`` on."""
    prompt_ids = tokenizer(list(prompts))["input_ids"]
    joined = tokenizer([p + a for p, a in zip(prompts, answers)])["input_ids"]
    return prompt_ids, [ids[:limit] for ids in joined]


def answer_nll(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 32) -> list[float]:
    """Mean NLL of each answer given its prompt, over the official ``input + output`` concatenation."""
    prompt_ids, sequences = encode_answers(tokenizer, prompts, answers, max_length(model, tokenizer))
    return sequence_nll(model, sequences, [len(ids) for ids in prompt_ids], tokenizer.pad_token_id, batch_size)


def document_statistics(model, tokenizer, documents: Sequence[str], batch_size: int = 16) -> list[TokenStatistics]:
    """``TokenStatistics`` of whole documents (truncated to the model's length limit), for MIA."""
    sequences = _document_sequences(model, tokenizer, documents)
    starts = [1] * len(sequences)
    return token_statistics(model, sequences, starts, tokenizer.pad_token_id, batch_size, vocab_moments=True)


def document_nll(model, tokenizer, documents: Sequence[str], batch_size: int = 16) -> list[float]:
    """Mean token NLL of whole documents (truncated to the model's length limit), for MIA."""
    sequences = _document_sequences(model, tokenizer, documents)
    return sequence_nll(model, sequences, [1] * len(sequences), tokenizer.pad_token_id, batch_size)


def _document_sequences(model, tokenizer, documents: Sequence[str]) -> list[list[int]]:
    limit = max_length(model, tokenizer)
    return [ids[:limit] for ids in tokenizer(list(documents))["input_ids"]]
