import json

import pandas as pd
import pytest

from unlearn_search import UnlearnSearchError
from unlearn_search.data import (
    collate,
    encode,
    fetch,
    item_kind,
    length_bucketed_batches,
    load_benchmark,
    load_documents,
    load_mmlu,
    resolve_data,
    separator,
)
from unlearn_search.data.tokenize import IGNORE_INDEX


def test_item_kind_follows_the_official_rule():
    assert item_kind("36307590sc1") == "sc"
    assert item_kind('"2ebbbb06-ab81"qa0') == "qa"
    assert item_kind("123qa4") == "qa"
    with pytest.raises(UnlearnSearchError, match="'123sc12'.*expected it to end in 'sc<N>'"):
        item_kind("123sc12")  # the scorer looks at id[:-1][-2:], which is "c1"


def test_shared_data_loads_with_its_counts(data_paths):
    train = load_benchmark(data_paths.benchmark, "train")
    assert (len(train.forget), len(train.retain)) == (1112, 1136)
    both = load_benchmark(data_paths.benchmark, "all")
    assert len(both.forget) == 1112 + 254
    assert {i.kind for i in train.forget} == {"sc", "qa"}
    assert len(load_documents(data_paths.benchmark, "member")) == 150
    assert len(load_documents(data_paths.benchmark, "nonmember", "validation")) == 34


def test_mmlu_has_all_subjects_and_a_deterministic_limit(data_paths):
    questions = load_mmlu(data_paths.mmlu, "test", limit_per_subject=2)
    assert len({q.subject for q in questions}) == 57
    assert len(questions) == 114
    assert questions == load_mmlu(data_paths.mmlu, "test", limit_per_subject=2)
    assert all(q.answer in "ABCD" for q in questions)


def _write(directory, name, rows):
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / name).open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def _row(i, kind="sc", task="Task1"):
    return {"id": f"doc{i}{kind}1", "input": "Some prompt", "output": "its answer", "task": task}


def _valid(directory):
    _write(directory, "forget_train.jsonl", [_row(1), _row(2, "qa")])
    _write(directory, "retain_train.jsonl", [_row(3), _row(4, "qa")])


def test_jsonl_benchmark_loads(tmp_path):
    _valid(tmp_path)
    benchmark = load_benchmark(tmp_path, "train")
    assert [i.id for i in benchmark.forget] == ["doc1sc1", "doc2qa1"]
    assert benchmark.retain[1].kind == "qa"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: (d / "retain_train.jsonl").unlink(), r"missing retain_train\.parquet or retain_train\.jsonl"),
        (
            lambda d: _write(d, "forget_train.jsonl", [{"id": "doc1sc1", "input": "x", "task": "Task1"}]),
            r"missing column output",
        ),
        (lambda d: _write(d, "forget_train.jsonl", []), r"no rows"),
        (lambda d: _write(d, "forget_train.jsonl", [{**_row(1), "id": "doc1xx1"}]), r"'doc1xx1'.*expected it to end"),
        (lambda d: _write(d, "forget_train.jsonl", [_row(1), _row(1)]), r"duplicate id 'doc1sc1'"),
        (lambda d: _write(d, "retain_train.jsonl", [_row(1)]), r"'doc1sc1' is in both the forget and the retain set"),
    ],
)
def test_bad_benchmark_files_get_one_clear_error(tmp_path, mutate, message):
    _valid(tmp_path)
    mutate(tmp_path)
    with pytest.raises(UnlearnSearchError, match=message):
        load_benchmark(tmp_path, "train")


def test_parquet_with_missing_column(tmp_path):
    _valid(tmp_path)
    (tmp_path / "forget_train.jsonl").unlink()
    pd.DataFrame([{"id": "a sc1", "input": "x", "output": "y"}]).to_parquet(tmp_path / "forget_train.parquet")
    with pytest.raises(UnlearnSearchError, match=r"forget_train\.parquet: missing column task"):
        load_benchmark(tmp_path, "train")


def test_data_resolution_order_and_error(tmp_path, monkeypatch, data_paths):
    monkeypatch.setenv("UNLEARN_SEARCH_CACHE", str(tmp_path / "cache"))
    _valid(tmp_path / "env" / "semeval25")
    monkeypatch.setenv("UNLEARN_SEARCH_DATA", str(tmp_path / "env"))
    assert resolve_data().benchmark == (tmp_path / "env" / "semeval25").resolve()
    assert resolve_data(data_paths.root).benchmark == data_paths.benchmark  # explicit wins
    with pytest.raises(UnlearnSearchError, match=r"looked in --data .*nowhere.*unlearn-search data fetch"):
        resolve_data(tmp_path / "nowhere")
    # A benchmark folder itself: MMLU and refusals inside it, else beside it.
    flat = tmp_path / "flat"
    _valid(flat)
    flat = flat.resolve()
    assert resolve_data(flat).mmlu == tmp_path.resolve() / "mmlu"
    (flat / "mmlu").mkdir()
    (flat / "refusals").mkdir()
    found = resolve_data(flat)
    assert (found.benchmark, found.mmlu, found.refusals) == (flat, flat / "mmlu", flat / "refusals")


def test_fetch_splits_by_document_deterministically(tmp_path):
    source = tmp_path / "release"
    _write(source, "forget.jsonl", [_row(i, k) for i in range(10) for k in ("sc", "qa")])
    _write(source, "retain.jsonl", [_row(i, k) for i in range(10, 20) for k in ("sc", "qa")])
    out = fetch(source.as_uri(), tmp_path / "data", validation_fraction=0.3, seed=1)
    benchmark = load_benchmark(out, "all")
    validation = load_benchmark(out, "validation")
    assert len(benchmark.forget) == 20 and len(validation.forget) == 6
    docs = {i.document_id for i in validation.forget}
    assert all(i.document_id not in docs for i in load_benchmark(out, "train").forget)
    again = fetch(source.as_uri(), tmp_path / "again", validation_fraction=0.3, seed=1)
    assert (again / "forget_validation.jsonl").read_text() == (out / "forget_validation.jsonl").read_text()


def test_separator_joins_words_with_one_space():
    assert separator("He has also", "led the teams") == " "
    assert separator("Question?\n", "Answer") == ""
    assert separator("prompt", " answer") == ""


@pytest.fixture(scope="module")
def gpt2_like_tokenizer(tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        ["He has also led the teams that developed MRI systems."] * 5, vocab_size=300, special_tokens=["<eos>", "<pad>"]
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<eos>", pad_token="<pad>")


def test_encode_keeps_the_prompt_a_prefix_and_masks_it(gpt2_like_tokenizer):
    tok = gpt2_like_tokenizer
    prompt, answer = "He has also", "led the teams"
    encoded = encode(tok, prompt, answer, max_length=64)
    prompt_ids = tok(prompt)["input_ids"]
    assert encoded.input_ids[: len(prompt_ids)] == prompt_ids
    assert encoded.input_ids[-1] == tok.eos_token_id
    assert tok.decode(encoded.input_ids[len(prompt_ids) : -1]) == " led the teams"
    assert encoded.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert encoded.labels[len(prompt_ids) :] == encoded.input_ids[len(prompt_ids) :]
    unmasked = encode(tok, prompt, answer, max_length=64, mask_prompt=False)
    assert unmasked.labels == unmasked.input_ids
    assert len(encode(tok, prompt, answer, max_length=4).input_ids) == 4


def test_encodings_are_kept_once_and_read_back_without_the_tokenizer(gpt2_like_tokenizer, tmp_path):
    """A search's workers read a set's encodings from the cache instead of tokenizing it again;
    the key holds the tokenizer's definition, the length cap and the texts."""
    from unlearn_search.data.tokenize import encode_all

    tok = gpt2_like_tokenizer
    prompts, answers = ["He has also", "He", ""], ["led the teams", "has", "developed MRI systems."]
    direct = [encode(tok, p, a, 16) for p, a in zip(prompts, answers)]
    assert encode_all(tok, prompts, answers, 16) == direct  # no cache: nothing written
    assert encode_all(tok, prompts, answers, 16, tmp_path) == direct
    (saved,) = tmp_path.iterdir()

    class Refusing(type(tok)):  # the same definition, but any tokenization is an error
        def __call__(self, *args, **kwargs):
            raise AssertionError("tokenized again")

    refusing = Refusing(tokenizer_object=tok.backend_tokenizer, eos_token="<eos>", pad_token="<pad>")
    assert encode_all(refusing, prompts, answers, 16, tmp_path) == direct
    # Another cap or text is another entry (so the refusing tokenizer is called, and refuses).
    for changed in ((prompts, answers, 8), (prompts, [*answers[:2], "other"], 16)):
        with pytest.raises(AssertionError, match="tokenized again"):
            encode_all(refusing, *changed, tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".partial")] == [saved.name]


def test_collate_pads_right_and_ignores_padding(gpt2_like_tokenizer):
    tok = gpt2_like_tokenizer
    batch = collate([encode(tok, "He", "has", 32), encode(tok, "He has also", "led the teams", 32)], tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    short = int(batch["attention_mask"][0].sum())
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, short:] == tok.pad_token_id).all()


def test_length_bucketed_batches_cover_everything_once_with_little_padding():
    import random

    lengths = [random.Random(i).randint(5, 300) for i in range(400)]
    batches = length_bucketed_batches(lengths, batch_size=8, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(400))
    assert batches == length_bucketed_batches(lengths, batch_size=8, seed=3)
    assert batches != length_bucketed_batches(lengths, batch_size=8, seed=4)

    def padding(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    shuffled = list(range(400))
    random.Random(0).shuffle(shuffled)
    naive = [shuffled[i : i + 8] for i in range(0, 400, 8)]
    assert padding(batches) < 0.25 * padding(naive)
