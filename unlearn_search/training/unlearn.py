"""One unlearning run in this process: load, train under a method and schedule, save."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from unlearn_search.data import DataPaths, load_benchmark
from unlearn_search.data.locate import cache_root
from unlearn_search.data.refusals import load_refusals
from unlearn_search.errors import UnlearnSearchError
from unlearn_search.methods import Method, Reference, get_method, get_schedule
from unlearn_search.models import load_model, load_tokenizer, read_target_manifest
from unlearn_search.models.loading import copy_target_manifest
from unlearn_search.models.trainable import LayerProbe, decoder_layers, plain_model, prepare_trainable, probe_layer
from unlearn_search.training.config import TrialConfig, check_output_dir
from unlearn_search.training.loop import (
    Report,
    TorchBackend,
    TrainData,
    TrainResult,
    alternative_answers,
    encode_items,
    run,
)


@dataclass
class Prepared:
    """Everything a run needs besides the student: built once, shared by the backends."""

    tokenizer: object
    data: TrainData
    steps: list
    method: object


def prepare(model_dir: Path, paths: DataPaths, config: TrialConfig) -> Prepared:
    tokenizer = load_tokenizer(model_dir)
    method = get_method(config.method, **config.method_params)
    schedule = get_schedule(config.schedule, **config.schedule_params)
    benchmark = load_benchmark(paths.benchmark, config.train_split)
    manifest = read_target_manifest(model_dir)
    if manifest:  # a reference target unlearns what it memorized
        benchmark = benchmark.restricted(manifest["forget_ids"] + manifest["retain_ids"])
    forget, retain = list(benchmark.forget), list(benchmark.retain)
    if not forget:
        raise UnlearnSearchError(f"no forget items in split {config.train_split!r} (expected at least one)")
    refusals = None
    if method.alternative == "refusal":
        refusals = load_refusals(config.refusals or paths.refusals)
    answers = alternative_answers(
        method.alternative,
        forget,
        retain,
        tokenizer,
        refusals,
        method.params.get("random_source", "retain"),
        config.seed,
    )
    cache = cache_root() / "tokenized"  # a search's workers tokenize each set once, not each
    data = TrainData(
        forget=encode_items(tokenizer, forget, config.max_length, cache=cache),
        retain=encode_items(tokenizer, retain, config.max_length, cache=cache),
        pad_token_id=tokenizer.pad_token_id,
        alternative=encode_items(tokenizer, forget, config.max_length, answers, cache) if answers else None,
    )
    steps = schedule.plan(len(forget), len(retain), config.batch_size, config.epochs, config.seed)
    return Prepared(tokenizer, data, steps, method)


def trainable_student(model: torch.nn.Module, config: TrialConfig, method: Method) -> torch.nn.Module:
    """``model`` with the parameters ``config`` trains: full, LoRA, last_k, or the modules ``method`` names."""
    return prepare_trainable(
        model,
        config.trainable,
        config.last_k,
        config.lora_rank,
        config.lora_alpha,
        config.lora_dropout,
        method_modules=method.trained_modules,
    )


def live_reference(teacher: torch.nn.Module, layer: int | None = None) -> Callable:
    """The frozen ``teacher``'s outputs on a batch; with ``layer``, its hidden states there too."""
    probe = probe_layer(teacher, layer)

    @torch.no_grad()
    def reference(batch):
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return Reference.from_logits(logits, batch["labels"], hidden=probe.take() if probe else None)

    return reference


def method_reference(teacher: torch.nn.Module, method: Method) -> Callable:
    """``live_reference`` with the hidden states of the layer ``method`` reads, if any."""
    return live_reference(teacher, method.probed_layer(len(decoder_layers(teacher))))


def method_probe(student: torch.nn.Module, method: Method) -> LayerProbe | None:
    """A probe on the student's layer that ``method`` reads, or None."""
    return probe_layer(student, method.probed_layer(len(decoder_layers(student))))


def unlearn(
    model_dir: str | Path,
    paths: DataPaths,
    config: TrialConfig,
    output: str | Path | None = None,
    on_boundary: Callable[[Report], bool | None] | None = None,
    progress: bool = False,
):
    """Train a copy of ``model_dir`` to forget; returns ``(model, tokenizer, TrainResult)``.

    The input directory is only read. With ``output`` the student is saved there as a plain
    Hugging Face checkpoint (LoRA merged); a diverged run raises before anything is written.
    """
    model_dir = Path(model_dir)
    if output is not None:
        check_output_dir(output, model_dir)
    torch.manual_seed(config.seed)
    prepared = prepare(model_dir, paths, config)
    method = prepared.method
    student = trainable_student(load_model(model_dir), config, method)
    reference = None
    if method.uses_reference():
        teacher = load_model(model_dir)
        teacher.requires_grad_(False)
        reference = method_reference(teacher, method)
        if config.teacher == "cached":
            from unlearn_search.training.teacher_cache import cached_sequences, compute_cache, default_top_k

            top_k = default_top_k(teacher.config.vocab_size) if config.teacher_top_k is None else config.teacher_top_k
            layer = method.probed_layer(len(decoder_layers(teacher)))
            sequences = cached_sequences(prepared.data)
            reference = compute_cache(teacher, sequences, prepared.data.pad_token_id, top_k, layer=layer)
            del teacher
    backend = TorchBackend(student, config.lr, config.weight_decay, config.max_grad_norm)
    probe = method_probe(student, method)
    try:
        result: TrainResult = run(
            method,
            prepared.steps,
            prepared.data,
            backend,
            reference,
            config.forget_loss_bound,
            on_boundary,
            progress,
            probe=probe,
        )
    finally:
        if probe is not None:
            probe.remove()  # the returned model runs without it
    model = plain_model(student)
    model.eval()
    if output is not None:
        model.save_pretrained(output)
        prepared.tokenizer.save_pretrained(output)
        copy_target_manifest(model_dir, output)  # scored later on what the original memorized
    return model, prepared.tokenizer, result
