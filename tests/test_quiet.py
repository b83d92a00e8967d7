"""The known third-party warnings are silenced at their real sources, and nothing else is."""

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator

import pytest
import torch

from unlearn_search.quiet import KNOWN_WARNINGS, silence_known_warnings


@contextlib.contextmanager
def _unfiltered_records(logger: logging.Logger) -> Iterator[list[logging.LogRecord]]:
    """The records ``logger`` passes at INFO and above, with our filters taken off it for the
    while (``silence_known_warnings`` inside puts them back on); level, handlers and filters are
    as before on leaving."""
    from unlearn_search.quiet import _DropKnownLine

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    ours = [f for f in logger.filters if isinstance(f, _DropKnownLine)]
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    for f in ours:
        logger.removeFilter(f)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        for f in [f for f in logger.filters if isinstance(f, _DropKnownLine)]:
            logger.removeFilter(f)
        for f in ours:
            logger.addFilter(f)


def _raised(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_warnings()
        try:
            call()
        except (RuntimeError, ValueError):  # no process group: the warning comes first
            pass
    return [str(w.message) for w in caught]


def _tiny_lora():
    from peft import LoraConfig, get_peft_model
    from transformers import OlmoConfig, OlmoForCausalLM

    config = OlmoConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
    )
    return get_peft_model(OlmoForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj"]))


@pytest.mark.parametrize(
    "call",
    [
        lambda: torch.distributed.all_gather_into_tensor(torch.zeros(2), torch.zeros(1)),
        lambda: torch.distributed.reduce_scatter_tensor(torch.zeros(1), torch.zeros(2)),
        lambda: _tiny_lora().base_model.model.is_gradient_checkpointing,
    ],
    ids=["all_gather_into_tensor", "reduce_scatter_tensor", "is_gradient_checkpointing"],
)
def test_each_known_warning_is_silenced_at_its_source(call):
    # Raised where the filters are off: the source still warns, with the text the entry matches.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call()
        except (RuntimeError, ValueError):
            pass
    assert any(w.category is FutureWarning for w in caught), [str(w.message) for w in caught]
    assert not [m for m in _raised(call) if "deprecated" in m]


def test_other_warnings_still_show():
    messages = _raised(
        lambda: (
            warnings.warn("our own warning", stacklevel=1),
            warnings.warn("`torch.load` is deprecated", FutureWarning, stacklevel=1),
        )
    )
    assert messages == ["our own warning", "`torch.load` is deprecated"]
    assert all(known.source and known.why for known in KNOWN_WARNINGS)


def _read_back(path, trainable) -> list[str]:
    """Ray Tune's own read-back of an experiment (``Tuner.restore(...).get_results()``), with what
    its ResultGrid logs."""
    import logging

    from ray import tune

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("ray.tune.analysis.experiment_analysis")
    logger.addHandler(handler)
    try:
        tune.Tuner.restore(str(path), trainable=trainable).get_results()
    finally:
        logger.removeHandler(handler)
    # A logger's filters decide before its handlers see a record.
    return [r.getMessage() for r in records]


def test_tunes_missing_result_files_line_is_silenced_and_other_failures_still_show(tmp_path):
    """A real Tune experiment of two trials, read back after one trial's result files are gone
    (what a trial cut before Tune wrote them leaves), then after the other's are damaged."""
    import logging

    import ray
    from ray import tune

    from unlearn_search.quiet import KNOWN_LOG_LINES, _DropKnownLine
    from unlearn_search.training.cluster import init_ray

    def reports(trial_config):  # defined here: Ray's workers cannot import a test module
        tune.report({"aggregate": trial_config["x"]})

    logger = logging.getLogger(KNOWN_LOG_LINES[0].logger)
    init_ray(num_cpus=1)
    try:
        tune.Tuner(
            reports,
            param_space={"x": tune.grid_search([1, 2])},
            run_config=tune.RunConfig(name="tune", storage_path=str(tmp_path), verbose=0),
        ).fit()
        first, second = sorted(p for p in (tmp_path / "tune").iterdir() if p.is_dir())
        for name in ("result.json", "progress.csv"):
            (first / name).unlink()
        for f in [f for f in logger.filters if isinstance(f, _DropKnownLine)]:
            logger.removeFilter(f)
        unfiltered = _read_back(tmp_path / "tune", reports)  # the source still logs the text the entry matches
        assert len(unfiltered) == 1 and "FileNotFoundError('Could not fetch metrics for" in unfiltered[0]
        silence_known_warnings()
        assert _read_back(tmp_path / "tune", reports) == []
        (second / "result.json").write_text("{not json\n")  # a failure of another kind is not hidden
        shown = _read_back(tmp_path / "tune", reports)
        assert len(shown) == 1 and "Failed to fetch metrics for 2 trial(s)" in shown[0]
    finally:
        ray.shutdown()
    assert all(line.source and line.why for line in KNOWN_LOG_LINES)


def test_ray_trains_checkpoint_line_is_silenced_at_its_source(tmp_path):
    """Ray Train's own storage persists a checkpoint, as each worker's report does: the line is
    logged there with the text the entry matches, and dropped once the filters are set."""
    import logging

    from ray.train import Checkpoint
    from ray.train.v2._internal.execution.storage import StorageContext

    from unlearn_search.quiet import KNOWN_LOG_LINES, _DropKnownLine

    known = next(line for line in KNOWN_LOG_LINES if line.logger.startswith("ray.train"))
    logger = logging.getLogger(known.logger)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    (tmp_path / "step").mkdir()
    (tmp_path / "step" / "state.pt").write_bytes(b"0")
    storage = StorageContext(str(tmp_path / "storage"), "trial")
    try:
        for f in [f for f in logger.filters if isinstance(f, _DropKnownLine)]:
            logger.removeFilter(f)
        storage.persist_current_checkpoint(Checkpoint.from_directory(tmp_path / "step"), "checkpoint_0")
        assert [r.getMessage() for r in records][-1].startswith("Checkpoint successfully created at: Checkpoint(")
        shown = len(records)
        silence_known_warnings()
        storage.persist_current_checkpoint(Checkpoint.from_directory(tmp_path / "step"), "checkpoint_1")
        assert len(records) == shown
        logger.info("Checkpoint saved elsewhere")  # another line of the same logger still shows
        assert records[-1].getMessage() == "Checkpoint saved elsewhere"
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_ray_trains_report_line_is_silenced_on_the_logger_that_logs_it():
    """Ray Train's worker context logs each report on a logger named by its module's file (a
    private module: this fails when it moves or renames its logger). A line as a worker logged it
    in a search is dropped; another line of that logger still shows."""
    import logging

    from ray.train.v2._internal.execution import context

    from unlearn_search.quiet import KNOWN_LOG_LINES

    known = next(line for line in KNOWN_LOG_LINES if "Reporting training result" in line.message)
    assert logging.getLogger(known.logger_name()) is context.logger
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    context.logger.addHandler(handler)
    level = context.logger.level
    context.logger.setLevel(logging.INFO)
    try:
        silence_known_warnings()
        context.logger.info(
            "Reporting training result 1: TrainingReport(checkpoint=Checkpoint(filesystem=local, "
            "path=/tmp/sugd/ray/lr_range/checkpoint_2026-12-06_09-11-15.424691), metrics={'probes': 13}, "
            "validation=False) from rank 0"
        )
        context.logger.info("Reporting training result 2: TrainingReport(checkpoint=None) from rank 1")
        context.logger.info("Reporting the workers' state")
    finally:
        context.logger.removeHandler(handler)
        context.logger.setLevel(level)
    assert [r.getMessage() for r in records] == ["Reporting the workers' state"]


def test_deepspeeds_shm_op_print_is_dropped_and_every_other_line_passes(capsys):
    """DeepSpeed's torch backend prints that its shared-memory all-reduce op loaded (a bare
    ``print``, in every worker of every trial). Raised from its real source: the line is dropped,
    ours around it kept, in order, a partial last line included."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op

    from unlearn_search.quiet import known_prints_dropped

    silence_known_warnings()
    get_accelerator()  # its one-time choice is logged first
    capsys.readouterr()
    with known_prints_dropped():
        print("before")
        assert build_shm_op() is not None, "DeepSpeed's shared-memory op did not load: its print is not raised"
        print("DeepSpeed built successfully, said by someone else")
        print("no newline", end="")
    assert capsys.readouterr().out == "before\nDeepSpeed built successfully, said by someone else\nno newline"
    build_shm_op()  # outside the context it prints: the line the entry names is DeepSpeed's own
    assert capsys.readouterr().out == "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully\n"


def test_ray_trains_print_patch_would_show_what_a_library_captures(caplog, capsys):
    """Why the job turns Ray Train's print patch off (``training.cluster.WORKER_ENV``): datasets
    fingerprints a new table with dill, which disassembles a function into a captured stdout;
    under the patch (Ray Train's own, private) each captured line is also logged on the root
    logger, which a worker's terminal shows. Without it nothing is printed."""
    import builtins
    import logging

    import datasets
    from ray.train.v2._internal.logging.patch_print import patch_print_function

    original = builtins.print
    try:
        with caplog.at_level(logging.INFO):
            datasets.Dataset.from_dict({"prompt": ["a question"], "answer": ["an answer"]})
            unpatched = [r.getMessage() for r in caplog.records if r.name == "root"]
            patch_print_function()
            datasets.Dataset.from_dict({"prompt": ["another question"], "answer": ["an answer"]})
            patched = [r.getMessage() for r in caplog.records if r.name == "root"]
    finally:
        builtins.print = original
    assert unpatched == [] and capsys.readouterr().out == ""
    assert any("LOAD_GLOBAL" in m for m in patched), patched


def test_a_trial_workers_terminal_shows_its_prints_and_no_third_party_lines(capfd, tmp_path):
    """A real Ray Train run on the job's cluster (``init_ray``): a worker that builds a datasets
    table and prints a line of its own. The driver's terminal shows that line, none of dill's
    bytecode, and no preemption watcher was started (Ray's core logs a line as one starts)."""
    import time

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from unlearn_search.training.cluster import init_ray

    def train() -> None:
        import datasets

        datasets.Dataset.from_dict({"prompt": ["a question"], "answer": ["an answer"]})
        print("the worker's own line")

    init_ray(num_cpus=1)
    shown = ""
    try:
        capfd.readouterr()
        run = RunConfig(name="quiet", storage_path=str(tmp_path))
        TorchTrainer(train, scaling_config=ScalingConfig(num_workers=1), run_config=run).fit()
        deadline = time.monotonic() + 30  # Ray forwards a worker's output to the driver as it polls
        while "the worker's own line" not in shown and time.monotonic() < deadline:
            time.sleep(0.5)
            shown += "".join(capfd.readouterr())
        time.sleep(1)
        shown += "".join(capfd.readouterr())
    finally:
        ray.shutdown()
    assert "the worker's own line" in shown, shown[-3000:]
    assert "LOAD_GLOBAL" not in shown and "PreemptionWatcher" not in shown, shown[-3000:]


def test_ray_trains_cleaner_line_is_silenced_in_every_process_of_the_job():
    """Without Ray's dashboard there is no state API: Ray Train's placement-group cleaner, run
    here in this process against a real local instance, warns at each check. The job's setup
    hook sets the filters in every Ray process, Ray's own actors included (a plain task shows it)."""
    import logging
    import time

    import ray
    from ray.train.v2._internal.execution.controller.placement_group_cleaner import PlacementGroupCleaner

    from unlearn_search.quiet import KNOWN_LOG_LINES, _DropKnownLine
    from unlearn_search.training.cluster import init_ray

    known = next(line for line in KNOWN_LOG_LINES if "placement-group cleaner" in line.source)
    logger = logging.getLogger(known.logger)

    def watched(seconds: float) -> list[str]:
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logger.addHandler(handler)
        cleaner = PlacementGroupCleaner("ffffffffffffffffffffffff01000000", 0.05, 1, 5)
        try:
            cleaner.start_monitoring()
            time.sleep(seconds)
        finally:
            cleaner._stop_event.set()
            logger.removeHandler(handler)
        return [r.getMessage() for r in records if "Controller actor state" in r.getMessage()]

    def filtered(name: str) -> list[str]:  # the patterns dropped on logger ``name``, in the calling process
        return [f.pattern.pattern for f in logging.getLogger(name).filters if isinstance(f, _DropKnownLine)]

    init_ray(num_cpus=1)
    try:
        for f in [f for f in logger.filters if isinstance(f, _DropKnownLine)]:
            logger.removeFilter(f)
        unfiltered = watched(2)
        assert unfiltered and all(re.fullmatch(known.message, m) for m in unfiltered), unfiltered
        silence_known_warnings()
        assert watched(2) == []
        assert known.message in ray.get(ray.remote(filtered).remote(known.logger))  # a Ray process set it as it started
    finally:
        ray.shutdown()


def test_deepspeeds_cpu_accelerator_line_is_silenced_at_its_source(monkeypatch):
    """DeepSpeed picks its accelerator once per process (a private module global, reset here: this
    fails when it moves) and, finding no GPU and no DS_ACCELERATOR, warns that it could not detect
    one. Raised from that real source: dropped with the filters set, shown without them; another
    line of DeepSpeed's logger still shows."""
    from deepspeed.accelerator import get_accelerator, real_accelerator

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    logger = logging.getLogger("DeepSpeed")
    assert real_accelerator.accel_logger is logger
    with _unfiltered_records(logger) as records:
        monkeypatch.setattr(real_accelerator, "ds_accelerator", None)
        assert get_accelerator()._name == "cpu"
        raised = [r.getMessage() for r in records if r.levelno == logging.WARNING]
        assert raised == [
            "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."
        ]

        records.clear()
        silence_known_warnings()
        monkeypatch.setattr(real_accelerator, "ds_accelerator", None)
        get_accelerator()
        logger.warning("Setting accelerator to CPU for another reason")
        assert [r.getMessage() for r in records if r.levelno == logging.WARNING] == [
            "Setting accelerator to CPU for another reason"
        ]


def test_rouge_scores_tokenizer_line_is_silenced_at_its_source():
    """rouge_score logs on absl's logger, at INFO, that a new scorer uses its default tokenizer
    (a Ray Train worker shows INFO). Raised by building a real scorer: shown without the filters,
    dropped with them; another absl line still shows."""
    from rouge_score import rouge_scorer

    with _unfiltered_records(logging.getLogger("absl")) as records:
        rouge_scorer.RougeScorer(["rougeL"])
        assert [r.getMessage() for r in records] == ["Using default tokenizer."]
        records.clear()
        silence_known_warnings()
        rouge_scorer.RougeScorer(["rougeL"])
        logging.getLogger("absl").info("Using another tokenizer.")
        assert [r.getMessage() for r in records] == ["Using another tokenizer."]
