"""MMLU accuracy by the log-likelihood of the answer letter after k-shot prompts."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from unlearn_search.data.mmlu import CHOICES, Question, load_mmlu, load_questions
from unlearn_search.evaluation.inference import batches_of, dealt, max_length, merged


def format_question(question: Question, with_answer: bool) -> str:
    lines = [question.question] + [f"{letter}. {text}" for letter, text in zip(CHOICES, question.choices)]
    return "\n".join(lines) + "\nAnswer:" + (f" {question.answer}\n\n" if with_answer else "")


OPEN_INSTRUCT_MAX_TOKENS = 2048  # open-instruct eval/mmlu/run_eval.py drops shots while a prompt is longer
# Written with every score: a baseline kept from another prompt format is not compared with it.
PROMPT_FORMAT = "open-instruct"


def format_subject(subject: str) -> str:
    """Open-Instruct's: each word after a space, so the header reads "about  abstract algebra"."""
    return "".join(" " + word for word in subject.split("_"))


def prompt(question: Question, shots: Sequence[Question]) -> str:
    header = f"The following are multiple choice questions (with answers) about {format_subject(question.subject)}.\n\n"
    return header + "".join(format_question(s, True) for s in shots) + format_question(question, False)


def fitted_prompt(tokenizer, question: Question, shots: Sequence[Question], limit: int) -> tuple[str, int]:
    """The prompt and its shot count: shots are dropped from the last while the prompt has more
    than ``limit`` tokens (counted without special tokens), as Open-Instruct does at 2048."""
    for count in range(len(shots), 0, -1):
        text = prompt(question, shots[:count])
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= limit:
            return text, count
    return prompt(question, []), 0


def choice_token_ids(tokenizer) -> list[int]:
    """The first token of " A" .. " D"; falls back to the bare letters if those collide."""
    for template in (" {}", "{}"):
        ids = [tokenizer(template.format(c), add_special_tokens=False)["input_ids"][0] for c in CHOICES]
        if len(set(ids)) == len(ids):
            return ids
    raise ValueError("the tokenizer maps the answer letters A-D to the same first token")


@torch.no_grad()
def evaluate_mmlu(
    model,
    tokenizer,
    directory: str | Path,
    shots: int = 5,
    limit_per_subject: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """Average accuracy over all questions and per subject, on ``test`` with ``dev`` shots."""
    questions = load_mmlu(directory, "test", limit_per_subject)
    dev: dict[str, list[Question]] = {}
    for q in questions:
        if q.subject not in dev:
            dev[q.subject] = load_questions(directory, q.subject, "dev", shots) if shots else []
    limit = min(OPEN_INSTRUCT_MAX_TOKENS, max_length(model, tokenizer))
    prompts = [fitted_prompt(tokenizer, q, dev[q.subject], limit)[0] for q in questions]
    # A question longer than the context even with no shot keeps its end, where the answer goes.
    encoded = [ids[-limit:] for ids in tokenizer(prompts)["input_ids"]] if prompts else []
    choice_ids = torch.tensor(choice_token_ids(tokenizer))
    order = sorted(range(len(questions)), key=lambda i: len(encoded[i]))
    right: dict[int, bool] = {}
    pad = tokenizer.pad_token_id
    for rows, kept in tqdm(dealt(batches_of(order, batch_size)), desc="MMLU", disable=not progress):
        width = max(len(encoded[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            input_ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            attention_mask[r, width - len(encoded[i]) :] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        # Only the last position's logits: a batch of long few-shot prompts never holds B x L x V.
        logits = (
            model(
                input_ids=input_ids.to(model.device),
                attention_mask=attention_mask.to(model.device),
                position_ids=position_ids.to(model.device),
                logits_to_keep=1,
            )
            .logits[:, -1]
            .float()
            .cpu()
        )
        predicted = logits[:, choice_ids].argmax(-1)
        if kept:
            right.update((i, CHOICES[int(predicted[r])] == questions[i].answer) for r, i in enumerate(rows))
    right = merged(right)
    correct = [right[i] for i in range(len(questions))]
    per_subject: dict[str, list[bool]] = defaultdict(list)
    for q, ok in zip(questions, correct):
        per_subject[q.subject].append(ok)
    return {
        "average": sum(correct) / len(correct),
        "prompt_format": PROMPT_FORMAT,
        "questions": len(correct),
        "subjects": {s: sum(v) / len(v) for s, v in sorted(per_subject.items())},
    }
