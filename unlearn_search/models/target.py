"""The reference target: a small OLMo trained from scratch until it has memorized the benchmark.

The SemEval organizers fine-tuned OLMo 1B/7B until they had memorized every item; with no hub
reachable, the default target is built the same way at a size that trains on a laptop CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from tqdm.auto import tqdm
from transformers import OlmoConfig, OlmoForCausalLM, PreTrainedTokenizerFast

from unlearn_search import __version__
from unlearn_search.data import DataPaths, collate, encode, length_bucketed_batches, load_documents
from unlearn_search.data.benchmark import TASKS, Item, load_set
from unlearn_search.data.locate import cache_lock, cache_root
from unlearn_search.errors import UnlearnSearchError
from unlearn_search.models.loading import TARGET_MANIFEST

EOS, PAD = "<|endoftext|>", "<|padding|>"


@dataclass(frozen=True)
class TargetPreset:
    """Sizes of the data subset, the model and its memorization training."""

    name: str
    documents: int  # documents taken from each of forget/retain x train/validation
    mia_documents: int  # MIA members trained on, and as many non-members held out
    vocab_size: int
    hidden_size: int
    layers: int
    heads: int
    max_length: int
    epochs: int
    batch_size: int
    peak_lr: float
    seed: int = 0


PRESETS = {
    "tiny": TargetPreset(
        "tiny",
        documents=6,
        mia_documents=12,
        vocab_size=2048,
        hidden_size=128,
        layers=4,
        heads=4,
        max_length=320,
        epochs=90,
        batch_size=8,
        peak_lr=3e-3,
    ),
    "small": TargetPreset(
        "small",
        documents=16,
        mia_documents=32,
        vocab_size=4096,
        hidden_size=192,
        layers=4,
        heads=4,
        max_length=320,
        epochs=100,
        batch_size=8,
        peak_lr=2.5e-3,
    ),
}


def get_preset(name: str) -> TargetPreset:
    if name not in PRESETS:
        raise UnlearnSearchError(f"target preset {name!r}: expected one of {', '.join(PRESETS)}")
    return PRESETS[name]


def _document_of(item: Item) -> str:
    return item.document_id


def select_items(items: list[Item], documents: int, seed: int) -> list[Item]:
    """All items of ``documents`` documents, spread over the tasks in turn (deterministic)."""
    by_task: dict[str, list[str]] = {}
    for item in items:
        docs = by_task.setdefault(item.task, [])
        if _document_of(item) not in docs:
            docs.append(_document_of(item))
    rng = random.Random(seed)
    for docs in by_task.values():
        rng.shuffle(docs)
    chosen: list[str] = []
    tasks = [t for t in TASKS if t in by_task] + sorted(set(by_task) - set(TASKS))
    while len(chosen) < documents and any(by_task[t] for t in tasks):
        for task in tasks:
            if by_task[task] and len(chosen) < documents:
                chosen.append(by_task[task].pop())
    keep = set(chosen)
    return [i for i in items if _document_of(i) in keep]


@dataclass
class TargetData:
    items: list[Item]
    members: list  # Document
    nonmembers: list  # Document, held out: never trained on

    def manifest(self) -> dict:
        return {
            "forget_ids": [i.id for i in self.items if i.set == "forget"],
            "retain_ids": [i.id for i in self.items if i.set == "retain"],
            "mia_member_ids": [d.id for d in self.members],
            "mia_nonmember_ids": [d.id for d in self.nonmembers],
        }


def select_data(paths: DataPaths, preset: TargetPreset) -> TargetData:
    items: list[Item] = []
    for set_name in ("forget", "retain"):
        for split in ("train", "validation"):
            items += select_items(load_set(paths.benchmark, set_name, split), preset.documents, preset.seed)
    forget_docs = {i.document_id for i in items if i.set == "forget"}
    members = load_documents(paths.benchmark, "member")
    # Members whose forget items were chosen come first: the data owner's whole document is memorized.
    rng = random.Random(preset.seed)
    rng.shuffle(members)
    members.sort(key=lambda d: d.id not in forget_docs)
    nonmembers = load_documents(paths.benchmark, "nonmember")
    rng.shuffle(nonmembers)
    n = min(preset.mia_documents, len(members), len(nonmembers))
    return TargetData(items, members[:n], nonmembers[:n])


def cache_key(paths: DataPaths, preset: TargetPreset) -> str:
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(preset), sort_keys=True).encode())
    digest.update(__version__.encode())
    for path in sorted(paths.benchmark.rglob("*")):
        if path.is_file() and path.suffix in (".parquet", ".jsonl"):
            digest.update(path.relative_to(paths.benchmark).as_posix().encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def default_target_dir(paths: DataPaths, preset: TargetPreset) -> Path:
    return cache_root() / "targets" / f"{preset.name}-{cache_key(paths, preset)}"


def train_tokenizer(texts: list[str], vocab_size: int, directory: Path) -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS, PAD])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token=EOS, pad_token=PAD, clean_up_tokenization_spaces=False
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def build_model(preset: TargetPreset, tokenizer) -> OlmoForCausalLM:
    config = OlmoConfig(
        vocab_size=len(tokenizer),
        hidden_size=preset.hidden_size,
        intermediate_size=4 * preset.hidden_size,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        max_position_embeddings=max(512, preset.max_length),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(preset.seed)
    return OlmoForCausalLM(config)


def training_examples(data: TargetData, tokenizer, max_length: int) -> list:
    """Items as prompt + answer + EOS (answer-masked), member documents as plain text."""
    examples = [encode(tokenizer, item.input, item.output, max_length) for item in data.items]
    examples += [encode(tokenizer, "", doc.text, max_length, mask_prompt=False) for doc in data.members]
    return examples


def memorize(model, examples: list, preset: TargetPreset, pad_token_id: int, progress: bool = True) -> float:
    """Train with a one-cycle learning rate until the examples are memorized; returns the last epoch's loss."""
    torch.manual_seed(preset.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=preset.peak_lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(examples) / preset.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=preset.peak_lr, total_steps=steps_per_epoch * preset.epochs, pct_start=0.1
    )
    lengths = [len(e.input_ids) for e in examples]
    model.train()
    bar = tqdm(range(preset.epochs), desc=f"memorizing ({preset.name})", disable=not progress)
    epoch_loss = float("nan")
    for epoch in bar:
        total, count = 0.0, 0
        for batch_ids in length_bucketed_batches(lengths, preset.batch_size, seed=preset.seed + epoch):
            batch = collate([examples[i] for i in batch_ids], pad_token_id)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            total, count = total + loss.item(), count + 1
        epoch_loss = total / count
        bar.set_postfix(loss=f"{epoch_loss:.4f}")
    model.eval()
    return epoch_loss


def build_target(
    paths: DataPaths, preset: TargetPreset, output: Path | None = None, progress: bool = True, force: bool = False
) -> Path:
    """Build (or reuse) the reference target; returns its checkpoint directory."""
    output = Path(output) if output else default_target_dir(paths, preset)
    if (output / TARGET_MANIFEST).exists() and not force:
        return output
    with cache_lock(output, f"the {preset.name} target"):
        if (output / TARGET_MANIFEST).exists() and not force:  # built while this process waited
            return output
        return _build(paths, preset, output, progress)


def _build(paths: DataPaths, preset: TargetPreset, output: Path, progress: bool) -> Path:
    started = time.time()
    torch.manual_seed(preset.seed)
    data = select_data(paths, preset)
    with _staged(output) as staging:
        texts = [f"{i.input} {i.output}" for i in data.items] + [d.text for d in data.members]
        tokenizer = train_tokenizer(texts, preset.vocab_size, staging)
        model = build_model(preset, tokenizer)
        loss = memorize(
            model, training_examples(data, tokenizer, preset.max_length), preset, tokenizer.pad_token_id, progress
        )
        _save(
            staging,
            model,
            tokenizer,
            {
                "preset": dataclasses.asdict(preset),
                "data": str(paths.benchmark),
                "final_train_loss": loss,
                "build_seconds": round(time.time() - started, 1),
                "parameters": sum(p.numel() for p in model.parameters()),
                **data.manifest(),
            },
        )
    return output


@contextmanager
def _staged(output: Path):
    """A fresh ``<output>.partial`` to build in, renamed to ``output`` only once complete, so an
    interrupted build never leaves a directory that a later call would reuse."""
    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    yield staging
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)


def _save(directory: Path, model, tokenizer, manifest: dict) -> None:
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    (directory / TARGET_MANIFEST).write_text(json.dumps(manifest, indent=1))


def resolve_model(spec: str, paths: DataPaths, progress: bool = True) -> Path:
    """A checkpoint directory from ``tiny``/``small`` (built once, then cached) or a local path."""
    from unlearn_search.models.loading import check_model_dir

    if spec in PRESETS:
        return build_target(paths, PRESETS[spec], progress=progress)
    return check_model_dir(spec)


def retrained_dir(original: str | Path) -> Path:
    """Where ``build_retrained`` keeps a reference target's gold standard: beside the original."""
    original = Path(original)
    return original.with_name(original.name + "-retrained")


def build_retrained(paths: DataPaths, original: Path, output: Path | None = None, progress: bool = True) -> Path:
    """The gold standard for a reference target: the same builder, tokenizer and schedule trained on
    its retain items alone, as retraining without the forget data would give (it never sees the
    forget items nor the member documents, which belong to the forget set's owners).

    The manifest is the original's, so both are scored on the same items; kept beside the original.
    """
    from unlearn_search.models.loading import load_tokenizer

    original = Path(original)
    manifest = json.loads((original / TARGET_MANIFEST).read_text())
    preset = TargetPreset(**manifest["preset"])
    output = Path(output) if output else retrained_dir(original)
    if (output / TARGET_MANIFEST).exists():
        return output
    started = time.time()
    data = select_data(paths, preset)
    retain = TargetData([i for i in data.items if i.set == "retain"], [], data.nonmembers)
    with _staged(output) as staging:
        tokenizer = load_tokenizer(original)
        tokenizer.save_pretrained(staging)
        model = build_model(preset, tokenizer)
        loss = memorize(
            model, training_examples(retain, tokenizer, preset.max_length), preset, tokenizer.pad_token_id, progress
        )
        _save(
            staging,
            model,
            tokenizer,
            {
                **manifest,
                "final_train_loss": loss,
                "retrained_from": str(original),
                "build_seconds": round(time.time() - started, 1),
            },
        )
    return output
