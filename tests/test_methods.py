"""Methods on the tiny reference target: each forgets while the retain set stays."""

import contextlib
import json
import math
import os
from pathlib import Path

import pytest
import torch

from unlearn_search import UnlearnSearchError
from unlearn_search.cli import main
from unlearn_search.evaluation.evaluate import EvalConfig, load_eval_data
from unlearn_search.evaluation.quick import quick_scores
from unlearn_search.methods import METHODS, SCHEDULES, get_method
from unlearn_search.methods.schedules import AGAD, SUGD, Joint
from unlearn_search.models import load_model, load_tokenizer, read_target_manifest
from unlearn_search.models.trainable import count_trainable, plain_model, prepare_trainable
from unlearn_search.training.config import parse_assignments, trial_config
from unlearn_search.training.loop import DivergedError
from unlearn_search.training.unlearn import unlearn

# ---- schedules -------------------------------------------------------------------------------


def test_joint_pairs_every_forget_item_once_per_epoch_with_cycled_retain():
    steps = Joint().plan(n_forget=10, n_retain=4, batch_size=4, epochs=2, seed=0)
    assert len(steps) == 6
    for epoch in (steps[:3], steps[3:]):
        assert sorted(i for s in epoch for i in s.forget) == list(range(10))
        assert [s.boundary for s in epoch] == [None, None, epoch[-1].boundary] and epoch[-1].boundary
    retain = [i for s in steps for i in s.retain]
    assert len(retain) == 20 and all(retain.count(i) == 5 for i in range(4))  # cycled evenly


def test_sugd_follows_each_forget_item_with_weighted_retain_items():
    steps = SUGD(chunk_size=4, positive_ratio=3, positive_factor=0.5, epochs_per_chunk=2).plan(8, 30, 8, 1, 0)
    # 2 chunks x 2 epochs x (4 groups of 1+3 items, 2 groups per step) = 8 steps.
    assert len(steps) == 8
    assert steps[0].forget == (0, 1)  # in order, no shuffling
    first_chunk = {i for s in steps[:4] for i in s.forget}
    assert first_chunk == {0, 1, 2, 3} and {i for s in steps[4:] for i in s.forget} == {4, 5, 6, 7}
    for step in steps:
        assert len(step.retain) == 3 * len(step.forget)
        n = len(step.forget) + len(step.retain)
        assert step.forget_scale == pytest.approx(len(step.forget) / n)  # weight -1 per forget item
        assert step.retain_scale == pytest.approx(0.5 * len(step.retain) / n)
    assert [s.boundary for s in steps if s.boundary] == ["chunk 1", "chunk 2"]
    # split_retain: the chunks see disjoint retain items while the retain set lasts.
    assert not {i for s in steps[:4] for i in s.retain} & {i for s in steps[4:] for i in s.retain}
    # Each chunk its own run (the authors' Trainer per chunk): a fresh optimizer and the lr
    # decaying linearly from the full value to 1/T over the chunk's T steps.
    assert [s.restart for s in steps] == [True, False, False, False] * 2
    assert [s.lr_scale for s in steps] == [1.0, 0.75, 0.5, 0.25] * 2
    constant = SUGD(chunk_size=4, positive_ratio=3, restart_per_chunk=False).plan(8, 30, 8, 1, 0)
    assert {(s.restart, s.lr_scale) for s in constant} == {(False, 1.0)}


def test_sugd_without_split_retain_spreads_the_whole_retain_set_after_each_chunks_items():
    """The authors' ``split_retain=False``: every chunk trains with the whole retain set,
    reshuffled, each forget item followed by ``n_retain // chunk`` retain items and the remainder
    after the last one; forget items stay in order and evenly spaced (not shuffled in)."""
    schedule = SUGD(chunk_size=3, positive_ratio=1, positive_factor=0.5, epochs_per_chunk=1, split_retain=False)
    steps = schedule.plan(6, 10, 4, 1, 0)  # per chunk: 3 forget + 10 retain = 13 items, 4 steps
    chunk_one, chunk_two = steps[:4], steps[4:]
    assert [s.boundary for s in steps if s.boundary] == ["chunk 1", "chunk 2"]
    for chunk, forget in ((chunk_one, [0, 1, 2]), (chunk_two, [3, 4, 5])):
        assert [i for s in chunk for i in s.forget] == forget
        assert sorted(i for s in chunk for i in s.retain) == list(range(10))  # the whole set, each once
        # f r r r | f r r r | f r r r r: 3 = 10 // 3 after each, the 4th after the last.
        assert [(len(s.forget), len(s.retain)) for s in chunk] == [(1, 3), (1, 3), (1, 3), (0, 1)]
    assert [i for s in chunk_one for i in s.retain] != [i for s in chunk_two for i in s.retain]  # reshuffled
    assert chunk_one[3].forget_scale == 0.0 and chunk_one[3].retain_scale == pytest.approx(0.5)


def test_agad_alternates_forgetting_and_annealing_phases():
    steps = AGAD(chunk_size=4, interleaving=0.5, annealing=0.5).plan(
        n_forget=10, n_retain=20, batch_size=4, epochs=2, seed=0
    )
    boundaries = [s.boundary for s in steps if s.boundary]
    # Annealing after every 2nd forgetting phase; the remainder chunk gets none; then final annealing.
    assert boundaries == [
        "chunk 1 forgetting",
        "chunk 2 forgetting",
        "chunk 2 annealing",
        "chunk 3 forgetting",
        "final annealing",
    ]
    first = [s for s in steps[:2]]
    assert all(s.phase == "ascent" and not s.retain for s in first)
    assert sorted(i for s in first for i in s.forget) == sorted([0, 1, 2, 3] * 2)  # chunk 1, two epochs
    annealing = [s for s in steps if s.phase == "annealing"]
    sampled = {i for s in annealing for i in s.retain}
    assert len(sampled) == 10 and sum(len(s.retain) for s in annealing) == 20  # half the retain set, 2 epochs
    final = [s for s in steps if s.phase == "final-annealing"]
    assert sorted(i for s in final for i in s.retain) == sorted(list(range(20)) * 2)
    # Each phase its own run (the authors' Trainer per phase): a restart, then lr decaying to 0.
    phases = [s.phase + (s.boundary or "") for s in steps]
    assert [s.lr_scale for s in steps[:2]] == [1.0, 0.5]  # chunk 1: 4 items, batch 4, 2 epochs
    assert [s.lr_scale for s in final] == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    assert sum(s.restart for s in steps) == len(boundaries) and steps[0].restart
    assert all(steps[i + 1].restart for i, s in enumerate(steps[:-1]) if s.boundary), phases
    constant = AGAD(chunk_size=4, interleaving=0.5, annealing=0.5, restart_per_phase=False).plan(10, 20, 4, 2, 0)
    assert [s.boundary for s in constant if s.boundary] == boundaries
    assert all(s.lr_scale == 1.0 and not s.restart for s in constant)


def test_agad_leftover_forget_items_get_no_annealing_phase():
    """As in the authors' code, items after the last whole chunk are forgotten without an
    annealing phase after them; also when they are all there is (where the authors' code fails);
    the final annealing still runs."""
    steps = AGAD(chunk_size=8, interleaving=1.0).plan(n_forget=5, n_retain=8, batch_size=4, epochs=1, seed=0)
    assert [s.boundary for s in steps if s.boundary] == ["chunk 1 forgetting", "final annealing"]


# ---- settings ------------------------------------------------------------------------------


def test_settings_are_split_validated_and_listed(capsys):
    config = trial_config(parse_assignments(["method=npo", "beta=0.2", "schedule=sugd", "chunk_size=16", "lr=1e-5"]))
    assert config.method_params == {"beta": 0.2} and config.schedule_params == {"chunk_size": 16}
    assert config.flat()["positive_ratio"] == 7 and config.flat()["retain_loss"] == "ce"
    with pytest.raises(
        UnlearnSearchError,
        match=r"setting 'betta' is not known .*expected one of .*beta.*; "
        r"did you mean 'beta'\?\)$",
    ):
        trial_config({"method": "npo", "betta": 0.1})
    for name, value in (("lr", math.inf), ("max_grad_norm", "nan"), ("forget_weight", -math.inf)):
        with pytest.raises(UnlearnSearchError, match=rf"{name}=.*expected a finite number"):
            trial_config({"method": "gd", name: value})
    with pytest.raises(UnlearnSearchError, match=r"method 'nope': expected one of ga, gd"):
        trial_config({"method": "nope"})
    with pytest.raises(UnlearnSearchError, match=r"schedule sugd needs a method with a retain term; ga has none"):
        trial_config({"method": "ga", "schedule": "sugd"})
    with pytest.raises(UnlearnSearchError, match=r"divergence='hellinger' \(expected one of kl, js, tv"):
        get_method("flat", divergence="hellinger")
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    for name in list(METHODS) + list(SCHEDULES):
        assert f"  {name} " in listing
    assert "positive_factor=0.5" in listing and "forget_weight=0.2" in listing


# ---- trainable parameters ----------------------------------------------------------------


def test_last_k_trains_only_the_last_layers(tiny_target):
    model = prepare_trainable(load_model(tiny_target), "last_k", last_k=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".layers.3." in n for n in trainable)
    with pytest.raises(UnlearnSearchError, match=r"last_k=9: expected 1 to 4"):
        prepare_trainable(load_model(tiny_target), "last_k", last_k=9)


def test_lora_trains_adapters_and_merges_into_a_plain_checkpoint(tiny_target, tmp_path):
    model = prepare_trainable(load_model(tiny_target), "lora", lora_rank=4, lora_alpha=8)
    trained, total = count_trainable(model)
    assert 0 < trained < total / 5
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)  # make the adapters matter
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(input_ids=x).logits
    merged = plain_model(model)
    merged.save_pretrained(tmp_path)
    reloaded = load_model(tmp_path)
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=x).logits, expected, atol=1e-4)


def test_trainable_method_trains_the_modules_the_method_names(tiny_target):
    # RMU: the MLP output projections of the steered layer and the two below it, as its authors.
    model = prepare_trainable(
        load_model(tiny_target), "method", method_modules=get_method("rmu", layer=3).trained_modules
    )
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2, 3)
    }
    # The default layer is a quarter of the way up: the authors' 7 of a 32-layer 7B, 0 of the tiny target's 4.
    rmu = get_method("rmu")
    assert rmu.probed_layer(32) == 7 and rmu.trained_modules(32) == tuple((i, "mlp.down_proj") for i in (5, 6, 7))
    assert rmu.probed_layer(4) == 0 and rmu.trained_modules(4) == ((0, "mlp.down_proj"),)
    with pytest.raises(
        UnlearnSearchError, match=r"^method rmu: layer=4 \(expected 0 to 3, the model's decoder layers\)$"
    ):
        prepare_trainable(load_model(tiny_target), "method", method_modules=get_method("rmu", layer=4).trained_modules)
    with pytest.raises(UnlearnSearchError, match=r"^trainable=method: this method names no parameters of its own"):
        prepare_trainable(load_model(tiny_target), "method", method_modules=get_method("gd").trained_modules)
    nothing = get_method("rmu", trained_module="mlp.nothing")
    with pytest.raises(UnlearnSearchError, match=r"decoder layer 0 has no module 'mlp.nothing'"):
        prepare_trainable(load_model(tiny_target), "method", method_modules=nothing.trained_modules)


def test_a_layer_probe_keeps_the_hidden_states_the_model_reports_for_that_layer(tiny_target):
    from unlearn_search.models.trainable import LayerProbe

    model = load_model(tiny_target)
    x = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        states = model(input_ids=x, output_hidden_states=True).hidden_states  # [embeddings, layer 0, ...]
        for layer in (0, 2):
            probe = LayerProbe(model, layer)
            model(input_ids=x)
            assert torch.equal(probe.take(), states[layer + 1])
            probe.remove()
    with pytest.raises(UnlearnSearchError, match=r"^layer=4: expected 0 to 3 \(the model's decoder layers\)$"):
        LayerProbe(model, 4)


def test_a_run_of_a_method_that_reads_hidden_states_needs_its_probe(tiny_target, data_paths):
    from unlearn_search.training.loop import TorchBackend, run
    from unlearn_search.training.unlearn import prepare

    prepared = prepare(tiny_target, data_paths, trial_config({"method": "rmu"}))
    backend = TorchBackend(load_model(tiny_target), 1e-3)
    with pytest.raises(
        UnlearnSearchError, match=r"^method rmu reads one layer's hidden states: run needs its LayerProbe$"
    ):
        run(prepared.method, prepared.steps, prepared.data, backend)


def test_rmu_loss_is_the_steering_and_retain_distances_by_hand():
    """gamma * d(h_forget, c u) + alpha * d(h_retain, h0_retain), d the mean over a row's answer
    tokens of the squared difference's mean over the hidden size, then over the rows."""
    from unlearn_search.methods import Reference
    from unlearn_search.methods import functional as F
    from unlearn_search.methods.base import StepInputs

    gen = torch.Generator().manual_seed(3)
    labels = {"forget": torch.tensor([[-100, 4, 5], [-100, -100, 6]]), "retain": torch.tensor([[-100, 7, -100]])}
    hidden = {name: torch.randn(len(value), 3, 4, generator=gen, dtype=torch.float64) for name, value in labels.items()}
    original = torch.randn(1, 3, 4, generator=gen, dtype=torch.float64)
    batches = {name: {"input_ids": value.clamp(min=0), "labels": value} for name, value in labels.items()}
    method = get_method("rmu", steering_coeff=2.0, forget_weight=0.5, retain_weight=10.0)
    step = StepInputs(
        forget=batches["forget"],
        retain=batches["retain"],
        student=None,
        reference=lambda which: Reference(torch.zeros(1, 2), hidden=original),
        hidden=lambda batch: hidden[next(n for n, b in batches.items() if b is batch)],
    )
    u = F.steering_direction(4, 2.0).tolist()

    def distance(h, target, rows):  # rows: each row's answer positions
        per_row = [
            sum(sum((h[b][t][d] - target(b, t, d)) ** 2 for d in range(4)) / 4 for t in ts) / len(ts) for b, ts in rows
        ]
        return sum(per_row) / len(per_row)

    steer = distance(hidden["forget"].tolist(), lambda b, t, d: u[d], [(0, (1, 2)), (1, (2,))])
    keep = distance(hidden["retain"].tolist(), lambda b, t, d: original[b, t, d].item(), [(0, (1,))])
    output = method.loss(step)
    assert output.loss.item() == pytest.approx(0.5 * steer + 10.0 * keep, rel=1e-6)
    assert output.parts == pytest.approx({"forget_steer": steer, "retain_activation": keep}, rel=1e-6)


# ---- guards ------------------------------------------------------------------------------


def test_a_diverging_loss_stops_the_run_and_writes_no_model(tiny_target, data_paths, tmp_path):
    out = tmp_path / "student"
    # A weight past float32's range: finite as a setting, infinite once it scales the loss.
    with pytest.raises(DivergedError, match=r"loss is -?inf at step 1 .*diverged"):
        unlearn(tiny_target, data_paths, trial_config({"method": "gd", "forget_weight": 1e39}), output=out)
    assert not out.exists()


def test_forget_loss_bound_stops_ascent(tiny_target, data_paths, tmp_path):
    settings = {"method": "ga", "lr": 2e-3, "epochs": 6}
    _, _, free = unlearn(tiny_target, data_paths, trial_config(settings), output=tmp_path / "free")
    # The written model is scored later on what its target memorized.
    assert read_target_manifest(tmp_path / "free") == read_target_manifest(tiny_target)
    _, _, bounded = unlearn(tiny_target, data_paths, trial_config({**settings, "forget_loss_bound": 5.0}))
    free_ce = max(-r["forget_neg_ce"] for r in free.losses)
    bounded_ce = max(-r["forget_neg_ce"] for r in bounded.losses)
    # Past the bound only by what the step that crossed it added, while free ascent runs away.
    assert bounded_ce < 10 and free_ce > bounded_ce + 5
    assert any(r["grad_norm"] == 0.0 for r in bounded.losses)  # steps where ascent was stopped


def _bounded_ascent_on_rank(rank: int, init_file: str, label_logits: list, bound: float, out: str) -> None:
    import torch.distributed as dist

    from unlearn_search.methods.base import StepInputs, ascent
    from unlearn_search.training.distributed import mean_over_ranks

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(label_logits))
    # One scored token over a 2-word vocabulary: CE = log(1 + exp(-a)) for label logit a.
    logits = torch.tensor([[[label_logits[rank], 0.0], [0.0, 0.0]]], requires_grad=True)  # position 0 predicts token 1
    batch = {"labels": torch.tensor([[-100, 0]])}
    step = StepInputs(
        forget=batch, retain=None, student=lambda b: logits, forget_loss_bound=bound, mean_over_ranks=mean_over_ranks
    )
    loss = ascent(step).value
    Path(out, f"{rank}.json").write_text(json.dumps({"ce": -float(loss.detach()), "ascends": loss.requires_grad}))
    dist.destroy_process_group()


@pytest.mark.parametrize("bound,ascends", [(1.0, False), (3.0, True)])
def test_forget_loss_bound_is_decided_alike_on_every_rank(tmp_path, bound, ascends):
    """Two gloo ranks whose shards' CEs (0.13 and 4.02) straddle the bound: each deciding alone,
    one would skip its backward and leave the other's ZeRO-3 collectives hanging. The mean (2.07)
    decides for both."""
    import torch.multiprocessing as mp

    mp.spawn(_bounded_ascent_on_rank, args=(str(tmp_path / "init"), [2.0, -4.0], bound, str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["ce"] == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-5)
    assert ranks[1]["ce"] == pytest.approx(math.log1p(math.exp(4.0)), rel=1e-5)
    assert [r["ascends"] for r in ranks] == [ascends, ascends]


def test_random_token_answers_are_the_same_in_every_process(tiny_target, data_paths):
    """Every worker of a trial draws the substitute answers itself, and their lengths decide its
    part of each step: a fast tokenizer's vocabulary order differs between processes."""
    import subprocess
    import sys

    script = (
        "import sys, json\n"
        "from unlearn_search.training.config import trial_config\n"
        "from unlearn_search.training.unlearn import prepare\n"
        "from unlearn_search.data.locate import paths_from_root\n"
        "config = trial_config({'method': 'random_label', 'random_source': 'tokens'})\n"
        "from pathlib import Path\n"
        "prepared = prepare(Path(sys.argv[1]), paths_from_root(Path(sys.argv[2])), config)\n"
        "print(json.dumps([e.input_ids for e in prepared.data.alternative]))\n"
    )
    runs = [
        subprocess.run(
            [sys.executable, "-c", script, str(tiny_target), str(data_paths.root)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.splitlines()[-1]
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def _report_on_rank(rank: int, init_file: str, values: list, out: str) -> None:
    import torch.distributed as dist

    from unlearn_search.training.distributed import means_over_ranks

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(values))
    Path(out, f"{rank}.json").write_text(json.dumps(means_over_ranks(values[rank])))
    dist.destroy_process_group()


def test_the_steps_one_reduction_carries_a_diverged_loss_to_every_rank(tmp_path):
    """The loop's one reduction per step: the loss and its parts averaged over the ranks. A rank
    whose loss is infinite makes the mean infinite on every rank, so all raise DivergedError at
    that step (one rank stopping alone would leave the others in a ZeRO collective)."""
    import torch.multiprocessing as mp

    values = [[2.0, 0.5, 1.0], [math.inf, 1.5, 3.0]]
    mp.spawn(_report_on_rank, args=(str(tmp_path / "init"), values, str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    for loss, *parts in ranks:
        assert loss == math.inf and parts == [1.0, 2.0]


def _gradient(model, method, step, data, reference, mean_over_ranks=lambda value: value) -> torch.Tensor:
    from unlearn_search.training.loop import step_inputs
    from unlearn_search.training.unlearn import method_probe

    model.zero_grad(set_to_none=True)
    forward = lambda batch: model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # noqa: E731
    probe = method_probe(model, method)  # the layer RMU reads, from the same pass
    inputs = step_inputs(method, step, data, forward, reference, mean_over_ranks=mean_over_ranks, probe=probe)
    method.loss(inputs).loss.backward()
    if probe is not None:
        probe.remove()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _uneven_step(prepared, world: int):
    """The first step whose parts over ``world`` ranks hold different numbers of rows, where plain
    per-rank means would give another gradient."""
    from unlearn_search.training.distributed import shard_steps

    def sizes(step):
        parts = [shard_steps([step], rank, world, prepared.data)[0] for rank in range(world)]
        return {len(p.forget) for p in parts} | {len(p.retain) for p in parts}

    return next(s for s in prepared.steps if len(sizes(s)) > 1)


def _moved_student_and_teacher(target):
    """The target as teacher, and a student moved off it by a seeded perturbation (NPO's and the
    KL's terms are not at 0 there)."""
    teacher, model = load_model(target), load_model(target)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return model, teacher


def _method_gradients_on_rank(rank: int, init_file: str, target: str, data_root: str, out: str) -> None:
    """Every registered method's gradient on its uneven step, this rank's part, averaged over the
    gloo ranks as ZeRO's data parallelism averages it."""
    import torch.distributed as dist

    from unlearn_search.data.locate import paths_from_root
    from unlearn_search.training.distributed import mean_over_ranks, shard_steps
    from unlearn_search.training.unlearn import method_reference, prepare

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    for name in sorted(METHODS):
        prepared = prepare(Path(target), paths_from_root(data_root), trial_config({"method": name}))
        model, teacher = _moved_student_and_teacher(target)
        part = shard_steps([_uneven_step(prepared, 2)], rank, 2, prepared.data)[0]
        reference = method_reference(teacher, prepared.method)
        gradient = _gradient(model, prepared.method, part, prepared.data, reference, mean_over_ranks)
        dist.all_reduce(gradient)
        if rank == 0:
            torch.save(gradient / 2, Path(out, f"{name}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_every_method_takes_the_same_gradient_on_one_process_and_on_two_gloo_workers(tmp_path, tiny_target, data_paths):
    """The same step on one process and split over two real gloo workers holding unequal parts:
    the workers' averaged gradient equals the one process's, for every registered method. A loss
    that left out its share would be off (the plain-mean case below)."""
    import torch.multiprocessing as mp

    from unlearn_search.training.unlearn import method_reference, prepare

    args = (str(tmp_path / "init"), str(tiny_target), str(data_paths.root), str(tmp_path))
    mp.spawn(_method_gradients_on_rank, args=args, nprocs=2)
    for name in sorted(METHODS):
        prepared = prepare(tiny_target, data_paths, trial_config({"method": name}))
        model, teacher = _moved_student_and_teacher(tiny_target)
        reference = method_reference(teacher, prepared.method)
        alone = _gradient(model, prepared.method, _uneven_step(prepared, 2), prepared.data, reference)
        workers = torch.load(tmp_path / f"{name}.pt")
        assert (workers - alone).abs().max() <= 1e-5 * alone.abs().max(), name


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_ranks_holding_unequal_parts_of_a_step_take_the_whole_steps_gradient(name, world, tiny_target, data_paths):
    """Ranks get parts balanced by padded length, not by rows; with their shares the mean of
    their gradients (what ZeRO averages) is one process's gradient on the whole step."""
    import dataclasses

    from unlearn_search.training.distributed import shard_steps
    from unlearn_search.training.unlearn import method_reference, prepare

    prepared = prepare(tiny_target, data_paths, trial_config({"method": name}))

    def parts_of(step):
        return [shard_steps([step], rank, world, prepared.data)[0] for rank in range(world)]

    step = _uneven_step(prepared, world)
    model, teacher = _moved_student_and_teacher(tiny_target)
    reference = method_reference(teacher, prepared.method)
    whole = _gradient(model, prepared.method, step, prepared.data, reference)
    parts = parts_of(step)
    averaged = sum(_gradient(model, prepared.method, part, prepared.data, reference) for part in parts) / world
    scale = whole.abs().max()
    assert (averaged - whole).abs().max() <= 1e-4 * scale
    # A step with fewer items than ranks: the ranks left over repeat an item and count for nothing.
    few = dataclasses.replace(step, forget=step.forget[: world - 1], retain=step.retain[: world - 1])
    whole_few = _gradient(model, prepared.method, few, prepared.data, reference)
    averaged_few = (
        sum(_gradient(model, prepared.method, part, prepared.data, reference) for part in parts_of(few)) / world
    )
    assert (averaged_few - whole_few).abs().max() <= 1e-4 * whole_few.abs().max()
    if name == "ga":  # each rank's plain mean, as before the shares, is another gradient
        plain = (
            sum(
                _gradient(model, prepared.method, dataclasses.replace(part, shares=()), prepared.data, reference)
                for part in parts
            )
            / world
        )
        assert (plain - whole).abs().max() > 0.05 * scale


METHOD_VARIANTS = (
    [(name, {}) for name in sorted(METHODS)]
    + [
        (name, {"retain_loss": kind})
        for name in sorted(METHODS)
        for kind in ("kl", "none")
        if "retain_loss" in {k.name for k in METHODS[name].knobs}
    ]
    + [("random_label", {"forget_weight": 0.0})]
)


@pytest.mark.parametrize("name,params", METHOD_VARIANTS)
def test_a_method_reads_the_student_on_the_batches_it_declares(name, params, tiny_target, data_paths):
    """The loop runs the declared reference passes, then one student pass over the declared
    batches: a batch read but not declared costs a pass more before the backward (under ZeRO-3 a
    whole gathered model more), one declared but unread a wasted pass."""
    from unlearn_search.methods.base import StepInputs
    from unlearn_search.training.unlearn import method_probe, method_reference, prepare

    prepared = prepare(tiny_target, data_paths, trial_config({"method": name, **params}))
    step = next(s for s in prepared.steps if s.forget and s.retain)
    batches = {
        which: prepared.data.batch(which, getattr(step, "forget" if which == "alternative" else which))
        for which in ("forget", "retain", "alternative")
    }
    model, read = load_model(tiny_target), []

    def student(batch):
        read.append(next(which for which, b in batches.items() if b is batch))
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    probe = method_probe(model, prepared.method)

    def hidden(batch):  # a read of the same student pass (RMU's hidden states)
        student(batch)
        return probe.take()

    reference, referenced = method_reference(load_model(tiny_target), prepared.method), []

    def reference_of(which):
        referenced.append(which)
        return reference(batches[which])

    prepared.method.loss(
        StepInputs(
            forget=batches["forget"],
            retain=batches["retain"],
            student=student,
            reference=reference_of,
            hidden=hidden if probe is not None else None,
            alternative=batches["alternative"],
        )
    )
    assert sorted(set(read)) == sorted(prepared.method.student_batches())
    assert sorted(set(referenced)) == sorted(prepared.method.reference_batches())


@pytest.mark.parametrize("name", ["flat", "ga_kl", "npo", "random_label", "rmu"])
def test_one_forward_over_a_steps_batches_gives_each_batchs_loss_and_gradient(name, tiny_target, data_paths):
    """Right-padded into one pass, each batch's logits and probed hidden states (and so the loss
    and its gradient) are those of its own pass: the joint forward changes memory, not results."""
    from unlearn_search.methods.base import StepInputs
    from unlearn_search.training.loop import step_inputs
    from unlearn_search.training.unlearn import method_probe, method_reference, prepare

    prepared = prepare(tiny_target, data_paths, trial_config({"method": name}))
    step = next(
        s
        for s in prepared.steps
        if s.forget
        and s.retain
        and prepared.data.batch("forget", s.forget)["input_ids"].shape[1]
        != prepared.data.batch("retain", s.retain)["input_ids"].shape[1]
    )
    teacher, model = load_model(tiny_target), load_model(tiny_target)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    reference, passes = method_reference(teacher, prepared.method), []
    probe = method_probe(model, prepared.method)

    def forward(batch):
        passes.append(batch["input_ids"].shape[0])
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    order = []
    joint = step_inputs(
        prepared.method,
        step,
        prepared.data,
        lambda b: order.append("student") or forward(b),
        lambda b: order.append("reference") or reference(b),
        probe=probe,
    )
    joint_loss = prepared.method.loss(joint).loss
    assert len(passes) == 1
    assert order == ["reference"] * len(prepared.method.reference_batches()) + ["student"]
    joint_loss.backward()
    joint_grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])  # RMU: up to its layer
    model.zero_grad(set_to_none=True)
    alone = StepInputs(
        forget=joint.forget,
        retain=joint.retain,
        alternative=joint.alternative,
        student=forward,
        reference=joint.reference,
        hidden=(lambda batch: forward(batch) is not None and probe.take()) if probe is not None else None,
        shares=joint.shares,
    )
    alone_loss = prepared.method.loss(alone).loss
    assert len(passes) > 2
    alone_loss.backward()
    alone_grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert joint_loss.item() == pytest.approx(alone_loss.item(), rel=1e-5)
    assert (joint_grad - alone_grad).abs().max() <= 1e-4 * alone_grad.abs().max()


def _first_adam_step_after_restart(backend, step, read) -> None:
    """Three steps, a fourth at half the lr, a restart, a fifth at half the lr: Adam's first
    step moves every weight by exactly lr (m / sqrt(v) = g / |g|), so only after the restart is
    every move 0.05 (lr 0.1, scale 0.5); the fourth, with three steps of moments behind it, is not."""
    torch.manual_seed(0)
    for _ in range(3):
        step(1.0)
    before = read()
    step(0.5)
    fourth = (read() - before).abs()

    def moments():
        return [
            v.data_ptr()
            for state in backend.scheduled.optimizer.state.values()
            for v in state.values()
            if torch.is_tensor(v) and v.numel() > 1
        ]

    held = moments()
    backend.restart()
    before = read()
    step(0.5)
    fifth = (read() - before).abs()
    assert (fourth - 0.05).abs().max() > 1e-3, fourth
    assert torch.allclose(fifth, torch.full_like(fifth, 0.05), atol=1e-5), fifth
    # Reset in place: DeepSpeed's ZeRO 1/2 and bf16 optimizers keep views into these tensors.
    assert held and moments() == held


def test_restart_and_lr_scale_on_the_torch_backend():
    from unlearn_search.training.loop import TorchBackend

    model = torch.nn.Linear(4, 3, bias=False)
    backend = TorchBackend(model, lr=0.1, max_grad_norm=1e9)

    def step(scale):
        backend.backward_step((model(torch.randn(2, 4)) * torch.randn(2, 3)).sum(), scale)

    _first_adam_step_after_restart(backend, step, lambda: model.weight.detach().clone())


def _restart_on_zero(rank: int, stage: int, init_file: str, out: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    import deepspeed
    import torch.distributed as dist

    from unlearn_search.training.distributed import DeepSpeedBackend, deepspeed_config

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    model = torch.nn.Linear(4, 3, bias=False)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=list(model.parameters()), config=deepspeed_config(stage, False, 0.1, 0.0, 1e9, 2)
    )
    backend = DeepSpeedBackend(engine, lr=0.1)

    def step(scale):
        backend.backward_step((engine(torch.randn(2, 4)) * torch.randn(2, 3)).sum(), scale)

    def read():
        with deepspeed.zero.GatheredParameters([engine.module.weight], enabled=stage == 3):
            return engine.module.weight.detach().clone()

    _first_adam_step_after_restart(backend, step, read)
    Path(out, "done").write_text(type(backend.scheduled.optimizer).__name__)
    dist.destroy_process_group()


@pytest.mark.parametrize("stage", [2, 3])
def test_restart_and_lr_scale_reach_the_optimizer_inside_a_zero_engine(tmp_path, stage):
    """DeepSpeed wraps the torch optimizer (ZeRO's partitioned fp32 copy): the learning rate and
    the restart must reach the optimizer that steps, and a restart resets the moments in place
    (ZeRO-2 keeps views into them). A real engine in its own process."""
    import torch.multiprocessing as mp

    mp.spawn(_restart_on_zero, args=(stage, str(tmp_path / "init"), str(tmp_path)), nprocs=1)
    # On CPU, torch's AdamW steps (no FusedAdam extension to compile and load in each worker).
    assert (tmp_path / "done").read_text() == "AdamW"


def test_only_offload_keeps_deepspeed_cpu_adam_on_cpu():
    """Offloaded optimizer states need DeepSpeedCPUAdam; every other CPU config takes torch's AdamW."""
    from unlearn_search.training.distributed import deepspeed_config

    for stage in (0, 2, 3):
        assert deepspeed_config(stage, False, 0.1, 0.0, 1.0, 2)["optimizer"]["params"]["torch_adam"] is True
    for stage in (2, 3):
        assert "torch_adam" not in deepspeed_config(stage, True, 0.1, 0.0, 1.0, 2)["optimizer"]["params"]


def test_output_may_not_be_the_input_model(tiny_target, data_paths):
    with pytest.raises(UnlearnSearchError, match="is the input model directory"):
        unlearn(tiny_target, data_paths, trial_config({"method": "ga"}), output=tiny_target)


TINY_SPACE = Path(__file__).resolve().parent / "spaces" / "tiny_gd.yaml"


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["trial", "--workers", "0"], "--workers 0: expected an integer >= 1"),
        (["trial", "--cpus-per-worker", "0"], "--cpus-per-worker 0.0: expected a value > 0"),
        (["trial", "--zero-stage", "1"], "--zero-stage: invalid choice: 1 (choose from 0, 2, 3)"),
        (["trial", "--max-new-tokens", "0"], "--max-new-tokens 0: expected an integer >= 1"),
        (["evaluate", "--mmlu-limit", "0"], "--mmlu-limit 0: expected an integer >= 1"),
        (["evaluate", "--split", "test"], "--split: invalid choice: 'test' (choose from 'train', 'validation', 'all')"),
        (["search", "--space", str(TINY_SPACE), "--num-samples", "0"], "--num-samples 0: expected an integer >= 1"),
        (["search", "--space", str(TINY_SPACE), "--time-budget", "-5"], "--time-budget -5.0: expected a value > 0"),
    ],
)
def test_the_commands_declared_options_are_checked_against_their_declaration(command, expected, capsys, tmp_path):
    """The resource, evaluation and search options come from ``Resources``', ``EvalConfig``'s and
    ``SearchSettings``' declarations: their bounds and choices, one line, before anything starts."""
    from unlearn_search.cli import main

    name, *options = command
    required = {"trial": ["--method", "gd"], "evaluate": ["--model", "tiny"], "search": []}[name]
    with pytest.raises(SystemExit) if "invalid choice" in expected else contextlib.nullcontext():
        code = main([name, *required, "--output", str(tmp_path / "unused"), *options])
        assert code == 2
    assert not (tmp_path / "unused").exists()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert expected in err, err


def test_a_trial_refuses_an_output_that_holds_its_input_model(tmp_path, data_paths):
    """`trial --model runs/a/model --output runs/a` would replace runs/a/model with the student."""
    from unlearn_search.training.trial import run_trial

    model = tmp_path / "runs" / "a" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    with pytest.raises(UnlearnSearchError, match=r"runs/a: contains the input model directory .*runs/a/model"):
        run_trial(model, data_paths.root, {"method": "ga"}, tmp_path / "runs" / "a")
    assert (model / "config.json").read_text() == "{}" and sorted(p.name for p in model.parent.iterdir()) == ["model"]


# ---- every method forgets on the tiny target -----------------------------------------------

# A short run per method with its default knobs; lr and epochs are chosen per method because the
# losses differ in scale (NPO sums token log-probs, GA/GD average them).
RUNS = {
    "ga": {"lr": 1.5e-4, "epochs": 6},
    "gd": {"lr": 2.12e-4, "epochs": 5},
    "ga_kl": {"lr": 5e-4, "epochs": 5},
    "npo": {"lr": 2e-4, "epochs": 4},
    "simnpo": {"lr": 5e-4, "epochs": 5},
    "random_label": {"lr": 5e-4, "epochs": 5},
    "idk": {"lr": 1e-3, "epochs": 5},
    "flat": {"lr": 2.2e-4, "epochs": 4},
    "adversarial": {"lr": 3e-4, "epochs": 5},
    "wga": {"lr": 3e-4, "epochs": 5},
    # With the authors' alpha 0 (no retain term) the retain set follows the forget set down on the
    # tiny target, and no lr keeps it: UNDIAL is asked to keep retain through its cross-entropy term.
    "undial": {"lr": 4e-4, "epochs": 5, "retain_loss": "ce"},
    "satimp": {"lr": 3e-3, "epochs": 5},
    "idk_dpo": {"lr": 2e-3, "epochs": 5},
    # Every weight: with the authors' few MLP projections (trainable=method) the tiny target's small
    # activations move too slowly towards a steering vector of norm 300.
    "rmu": {"lr": 2.12e-3, "epochs": 5, "trainable": "full"},
    "sugd": {"method": "gd", "schedule": "sugd", "lr": 1e-3, "chunk_size": 8, "epochs_per_chunk": 3},
    "agad": {"method": "gd", "schedule": "agad", "lr": 1e-3, "chunk_size": 8, "epochs": 3},
}
# Methods without a retain term (GA, FLAT) drag the retain set along
# on a 2M-parameter model.
RETAIN_TOLERANCE = {"ga": 0.4, "flat": 0.65, "adversarial": 0.25, "sugd": 0.25}
# The tiny target is not bit-reproducible across CPUs or thread counts, and where a method's
# forgetting sets in moves with the build: the lr is fitted to the target at hand, as the search
# fits it to a model. Each run above starts where it passes on the CI machine's build. A run that
# forgets too little doubles it, one that costs the retain set too much halves it; once both sides
# are known, their geometric mean. The method must pass within LR_TRIES runs.
LR_TRIES = 6


# MMLU 0-shot: these tests read the forget and retain scores only.
QUICK = EvalConfig(split="train", max_new_tokens=64, mmlu_limit=1, mmlu_shots=0)


@pytest.fixture(scope="module")
def memorized(tiny_target, data_paths):
    data = load_eval_data(data_paths, QUICK, read_target_manifest(tiny_target))
    return data, quick_scores(load_model(tiny_target), load_tokenizer(tiny_target), data, data_paths.mmlu, QUICK)


def forgetting_falls_short(run: str, before: dict, after: dict) -> list[str]:
    """What a run left remembered: regurgitation must fall by half, and the SUGD schedule must
    also remove the answers to questions."""
    short = []
    if after["forget_regurgitation"] > before["forget_regurgitation"] - 0.5:
        short.append("forget_regurgitation")
    if after["forget_knowledge"] > before["forget_knowledge"] - (0.5 if run == "sugd" else 0.0):
        short.append("forget_knowledge")
    return short


def retain_lost(run: str, before: dict, after: dict) -> list[str]:
    tolerance = RETAIN_TOLERANCE.get(run, 0.15)
    return [key for key in ("retain_regurgitation", "retain_knowledge") if after[key] < before[key] - tolerance]


@pytest.mark.slow
@pytest.mark.parametrize("run", list(RUNS))
def test_method_forgets_and_keeps_retain(run, tiny_target, data_paths, memorized):
    data, before = memorized
    assert before["forget_regurgitation"] > 0.95
    settings = {"method": run, **RUNS[run]} if "method" not in RUNS[run] else dict(RUNS[run])
    tried, weak, strong = [], None, None  # the highest lr that forgot too little, the lowest that lost retain
    for _ in range(LR_TRIES):
        model, tokenizer, result = unlearn(tiny_target, data_paths, trial_config(settings))
        assert result.reports and result.reports[-1].step == result.steps
        after = quick_scores(model, tokenizer, data, data_paths.mmlu, QUICK)
        short, lost = forgetting_falls_short(run, before, after), retain_lost(run, before, after)
        tried.append({"lr": settings["lr"], "short": short, "lost": lost, **after})
        if not short and not lost:
            return
        if short and lost:  # no lr trades one for the other here
            break
        weak, strong = (settings["lr"], strong) if short else (weak, settings["lr"])
        settings["lr"] = math.sqrt(weak * strong) if weak and strong else settings["lr"] * (2.0 if short else 0.5)
    pytest.fail(f"{run}: no lr kept retain while forgetting (before {before}): {tried}")


def test_docs_methods_table_is_the_registry():
    from pathlib import Path

    from unlearn_search.cli import methods_markdown
    from unlearn_search.methods import METHODS, SCHEDULES

    text = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    assert text == methods_markdown(), "docs/methods.md is stale: unlearn-search methods --markdown > docs/methods.md"
    for name in list(METHODS) + list(SCHEDULES):
        assert f"| `{name}` |" in text


def test_a_loss_term_names_the_batch_and_unit_its_mean_is_over():
    """The base weights each term by the rank's share: a bare tensor, which would skip it, is refused."""
    from unlearn_search.methods.base import StepInputs, Term, compose

    step = StepInputs(forget={}, retain=None, student=lambda batch: None, shares={("forget", "rows"): 0.5})
    with pytest.raises(TypeError, match=r"a loss term must be a methods.base.Term"):
        compose(step, "forget_x", lambda s: torch.tensor(2.0), 1.0, "none", 0.0)
    shared = compose(step, "forget_x", lambda s: Term(torch.tensor(2.0), "forget", "rows"), 3.0, "none", 0.0)
    assert float(shared.loss) == 3.0 and shared.parts == {"forget_x": 1.0}  # 3 x 2 x its share 0.5
    weighted = ((2.0, Term(torch.tensor(1.0), "forget", "rows")), (1.0, Term(torch.tensor(4.0), "forget", "tokens")))
    assert float(compose(step, "forget_x", lambda s: weighted, 1.0, "none", 0.0).loss) == 2.0 * 0.5 + 4.0
    with pytest.raises(ValueError, match=r"Term.unit: expected one of rows, tokens \(got 'items'\)"):
        Term(torch.tensor(1.0), "forget", "items")
    with pytest.raises(ValueError, match=r"Term.batch: expected one of forget, retain, alternative"):
        Term(torch.tensor(1.0), "refusal", "rows")


def test_no_setting_name_means_two_things():
    """A setting name is a trial field, a method knob or a schedule knob, never two of them, and a
    knob that several methods share has one type: a name in --set, a space or MLflow has one meaning."""
    from unlearn_search.training.config import TRIAL_FIELDS

    owners: dict[str, set[str]] = {}
    types: dict[str, set[type]] = {}
    for kind, registry in (("method", METHODS), ("schedule", SCHEDULES)):
        for cls in registry.values():
            for knob in cls.knobs:
                owners.setdefault(knob.name, set()).add(kind)
                types.setdefault(knob.name, set()).add(type(knob.default))
    assert not set(owners) & set(TRIAL_FIELDS), sorted(set(owners) & set(TRIAL_FIELDS))
    assert not [name for name, kinds in owners.items() if len(kinds) > 1]
    assert not [name for name, found in types.items() if len(found - {int} if float in found else found) > 1]
