"""The learning-rate range test that fits a space's ``lr`` range to the model before a search.

Smith (2017, "Cyclical Learning Rates for Training Neural Networks", section 3.3) runs one short
training with the learning rate rising each step and reads the useful range off the loss curve.
Here the run is the space's first start point (its method, schedule, trainable parameters and
resources), for ``steps`` steps with the lr rising geometrically over the space's ``params.lr``
range, from ``low`` to ``high``:
step ``i`` of ``n`` trains at ``low * (high / low) ** (i / (n - 1))``. Every ``probe_every``
steps every rank scores the same fixed forget and retain items (token-mean NLL), so the curve
does not move with the batches. The *onset* is the first lr at which the forget NLL has grown
by a factor ``e**rise`` over its start (two probes in a row, so one noisy probe does not place
it): a ratio, because a memorized target starts at 0.003 nats and a real checkpoint near 1; the
search then samples ``lr`` log-uniformly in ``[onset * 10**-below, onset * 10**above]``, capped
where the retain NLL has grown by the same factor or the run diverged.

Why below the onset: the test reaches the onset after a few steps at the top of its ramp, a
trial trains hundreds at one lr, and Adam's steps add up; the range reaches a decade under the
onset by default (on `small`, the published start at onset / 1.8 and onset / 3.3 scored 0.465
and 0.452; docs/results.md). The absolute lrs a model needs differ by orders of
magnitude between a 4M-parameter target and OLMo-7B, and between last_k and LoRA students; the
onset is measured on the model the search runs on, with its first start's trainable parameters.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearn_search.errors import UnlearnSearchError
from unlearn_search.methods.base import declared, setting

RANGE_FILE = "lr_range.json"  # in the search's output: the curve, the onset and the fitted range
RANGE_RUN = "lr_range"  # the Ray Train run's name, under the search's output
PROBES_FILE = "probes.json"  # in the run's checkpoint
FLOOR = 1e-6  # nats: an NLL the ratio is taken against at least (a start of exactly 0 has none)


@dataclass(frozen=True)
class RangeTest:
    """A space's ``lr_range_test`` block: how the test runs and how its curve becomes a range."""

    steps: int = setting(48, "optimizer steps of the test", low=2)
    low: float = setting(1.0e-6, "the lr of its first step: a space's params.lr low", positive=True)
    high: float = setting(1.0e-1, "the lr of its last step: a space's params.lr high", positive=True)
    probe_every: int = setting(4, "steps between two probes of the fixed items (1 to steps)", low=1)
    probe_items: int = setting(8, "forget items and retain items each probe scores (token-mean NLL)", low=1)
    rise: float = setting(
        1.0,
        "the onset is the first lr where the forget NLL has grown `e**rise`-fold (two probes in a row)",
        positive=True,
    )
    below: float = setting(1.0, "decades the searched lr range reaches below the onset", low=0)
    above: float = setting(
        0.5,
        "decades it reaches above the onset (capped where the retain NLL rose as much, or the run diverged)",
        low=0,
    )

    def __post_init__(self) -> None:
        # Each field against its declaration, then the rules between fields.
        expected = {name: knob.problem(getattr(self, name)) for name, knob in declared(RangeTest).items()}
        if not expected["high"] and self.high <= self.low:
            expected["high"] = f"a value > low ({self.low})"
        if not expected["probe_every"] and self.probe_every > self.steps:
            expected["probe_every"] = f"an integer from 1 to steps ({self.steps})"
        if not expected["above"] and self.below + self.above <= 0:
            expected["above"] = "a value >= 0, with below above 0 in all"
        for name, words in expected.items():
            if words:
                raise UnlearnSearchError(f"lr_range_test.{name}: expected {words} (got {getattr(self, name)!r})")

    def lr_at(self, step: int) -> float:
        """The lr of step ``step`` (0-based)."""
        return self.low * (self.high / self.low) ** (step / (self.steps - 1))


@dataclass(frozen=True)
class Probe:
    step: int  # steps done before the probe
    lr: float  # the lr of the last of them (the test's low before any)
    forget_nll: float
    retain_nll: float


@dataclass(frozen=True)
class FittedRange:
    """The test's reading: the onset and the lr range the search samples (``onset`` None: the
    forget NLL never rose, and the range ends at the top of the test)."""

    onset: float | None
    low: float
    high: float
    capped_by: str | None = None  # "retain" or "divergence" when one of them lowered high


@dataclass
class RangeResult:
    probes: list[Probe]
    fitted: FittedRange
    diverged_at: int | None  # the step whose loss was not finite, if any
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "fitted": dataclasses.asdict(self.fitted),
            "diverged_at": self.diverged_at,
            "seconds": self.seconds,
            "settings": self.settings,
            "probes": [dataclasses.asdict(p) for p in self.probes],
        }


# ---------------------------------------------------------------- pure parts


def ramp(steps: Sequence, test: RangeTest) -> list:
    """``test.steps`` of a schedule's planned steps (cycled when it has fewer), each with its lr
    scale on the ramp relative to ``test.low``, a boundary at every probe, and no restarts."""
    if not steps:
        raise UnlearnSearchError("lr_range_test: the first start point plans no training steps")
    planned = []
    for i in range(test.steps):
        probe = (i + 1) % test.probe_every == 0 or i == test.steps - 1
        planned.append(
            dataclasses.replace(
                steps[i % len(steps)],
                lr_scale=test.lr_at(i) / test.low,
                restart=False,
                boundary=f"probe {i + 1}" if probe else None,
            )
        )
    return planned


def probe_items(steps: Sequence, n_retain: int, count: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The probe's items: the first ``count`` forget items the ramp trains on (their NLL is what
    unlearning raises), and ``count`` retain items it does not train on where there are enough
    (a held-out view of what the model keeps)."""
    forget = list(dict.fromkeys(i for step in steps for i in step.forget))[:count]
    trained = {i for step in steps for i in step.retain}
    retain = [i for i in range(n_retain) if i not in trained][:count]
    if len(retain) < count:
        retain += [i for i in range(n_retain) if i in trained][: count - len(retain)]
    return tuple(forget), tuple(retain)


def _risen(probes: Sequence[Probe], value, threshold: float) -> Probe | None:
    """The first probe of the first two in a row whose value reaches ``threshold`` (the last
    probe alone counts too: the test ends there)."""
    for i, probe in enumerate(probes):
        if value(probe) >= threshold and (i + 1 == len(probes) or value(probes[i + 1]) >= threshold):
            return probe
    return None


def fit_range(probes: Sequence[Probe], test: RangeTest, diverged_at: int | None = None) -> FittedRange:
    """The onset and the searched range from the probes (the first is taken before any step)."""
    if len(probes) < 2:
        raise UnlearnSearchError(
            "lr_range_test: fewer than two probes (expected one before the ramp and one after at least one step)"
        )
    start, curve, factor = probes[0], list(probes[1:]), math.exp(test.rise)
    onset_probe = _risen(curve, lambda p: p.forget_nll, max(start.forget_nll, FLOOR) * factor)
    onset = onset_probe.lr if onset_probe else None
    centre = onset if onset is not None else test.high
    # Within the range the space allows: the test ramps over it, so the onset lies inside.
    low, capped_by = max(test.low, centre * 10**-test.below), None
    high = min(test.high, centre * 10**test.above)
    broken = _risen(curve, lambda p: p.retain_nll, max(start.retain_nll, FLOOR) * factor)
    caps = [(broken.lr, "retain")] if broken else []
    if diverged_at is not None:
        caps.append((test.lr_at(max(0, diverged_at - 2)), "divergence"))  # the last step that stayed finite
    for cap, reason in sorted(caps):
        if cap < high:
            high, capped_by = max(cap, centre), reason  # never below the onset: the range must hold it
    return FittedRange(onset, low, high, capped_by)


def fitted_param(param, fitted: FittedRange):
    """The space's ``lr`` parameter with the fitted bounds."""
    if param.distribution != "float" or not param.log:
        raise UnlearnSearchError(
            f"params.{param.name}: the lr range test fits a float lr with log: true (got {param.distribution})"
        )
    return dataclasses.replace(param, low=fitted.low, high=fitted.high)


def moved_starts(starts: Sequence[dict], fitted: FittedRange) -> tuple[tuple[dict, ...], list[str]]:
    """The start points with any lr outside the fitted range moved to the range's log-midpoint,
    and one line per move. A published lr belongs to the model it was published for: on this
    one the test's best guess is the middle of its range, where the nearest end is by
    construction the least likely value (and Optuna models no value outside a distribution)."""
    middle = math.sqrt(fitted.low * fitted.high)
    moved, notes = [], []
    for number, start in enumerate(starts, 1):
        lr = start.get("lr")
        if lr is not None and not fitted.low <= lr <= fitted.high:
            notes.append(f"start {number}: lr {lr:.3g} is outside this model's range; it starts at {middle:.3g}")
            start = {**start, "lr": middle}
        moved.append(start)
    return tuple(moved), notes


# ---------------------------------------------------------------- the run


def range_settings(settings: dict[str, Any], test: RangeTest) -> dict[str, Any]:
    """A start's trial settings as the test runs them: at the ramp's base lr, no kept boundary."""
    return {**settings, "lr": test.low, "keep_best": False}


class Prober:
    """At each probe boundary, every rank scores the probe batches (ZeRO-3 forwards are collective)."""

    def __init__(self, backend, batches: tuple, test: RangeTest):
        self.backend, self.batches, self.test = backend, batches, test
        self.probes: list[Probe] = []

    def probe(self, step: int) -> None:
        import torch

        from unlearn_search.methods.functional import cross_entropy

        was_training = self.backend.engine.training
        self.backend.engine.eval()
        with torch.no_grad():
            forget, retain = (
                float(cross_entropy(self.backend.forward(b), b["labels"].to(self.backend.device))) for b in self.batches
            )
        self.backend.engine.train(was_training)
        lr = self.test.lr_at(step - 1) if step else self.test.low
        self.probes.append(Probe(step, lr, forget, retain))

    def __call__(self, report) -> None:
        self.probe(report.step)


def range_worker(cfg: dict[str, Any]) -> None:
    """What every Ray Train worker of the test runs: the trial's models, the ramp, the probes."""
    import ray.train

    from unlearn_search.training.distributed import DeepSpeedBackend, shard_steps
    from unlearn_search.training.loop import DivergedError, run
    from unlearn_search.training.trial import build_reference, build_student, start_worker

    test = RangeTest(**cfg["test"])
    worker = start_worker(cfg)
    engine = build_student(worker)
    reference, _, probe = build_reference(worker, engine, cfg.get("teacher_cache"))
    data = worker.prepared.data
    planned = ramp(worker.prepared.steps, test)
    forget, retain = probe_items(planned, len(data.retain), test.probe_items)
    backend = DeepSpeedBackend(engine, test.low)
    prober = Prober(backend, (data.batch("forget", forget), data.batch("retain", retain)), test)
    prober.probe(0)
    diverged_at = None
    try:
        run(
            worker.prepared.method,
            shard_steps(planned, worker.rank, worker.world, data),
            data,
            backend,
            reference,
            worker.config.forget_loss_bound,
            prober,
            progress=worker.rank == 0,
            probe=probe,
        )
    except DivergedError as error:
        diverged_at = error.step
    # As a checkpoint: Ray Train keeps a run's metrics only with one.
    with tempfile.TemporaryDirectory() as directory:
        if worker.rank == 0:
            (Path(directory) / PROBES_FILE).write_text(
                json.dumps({"probes": [dataclasses.asdict(p) for p in prober.probes], "diverged_at": diverged_at})
            )
        ray.train.report(
            {"probes": len(prober.probes)},
            checkpoint=ray.train.Checkpoint.from_directory(directory) if worker.rank == 0 else None,
        )


def run_range_test(
    model_dir: str | Path,
    data_root: str | Path,
    settings: dict[str, Any],
    resources,
    test: RangeTest,
    output: Path,
    teacher_cache_dir: Path | None = None,
) -> RangeResult:
    """Run the test on Ray Train with the trial's resources (Ray must be initialized)."""
    import torch
    from ray.train import RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from unlearn_search.training.config import trial_config
    from unlearn_search.training.trial import build_teacher_cache, scaling_config

    started = time.time()
    settings = range_settings(settings, test)
    config = trial_config(settings)
    teacher_cache = None
    if config.teacher == "cached":
        path = build_teacher_cache(model_dir, data_root, config, teacher_cache_dir or output / "teacher_cache")
        teacher_cache = str(path) if path else None
    use_gpu = resources.gpus_per_worker > 0
    trainer = TorchTrainer(
        range_worker,
        train_loop_config={
            "settings": settings,
            "model_dir": str(Path(model_dir).resolve()),
            "data": str(Path(data_root).resolve()),
            "resources": dataclasses.asdict(resources),
            "teacher_cache": teacher_cache,
            "test": dataclasses.asdict(test),
        },
        scaling_config=scaling_config(resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu and torch.cuda.is_available() else "gloo"),
        run_config=RunConfig(name=RANGE_RUN, storage_path=str((output / "ray").resolve())),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as directory:
        record = json.loads((Path(directory) / PROBES_FILE).read_text())
    probes, diverged_at = [Probe(**p) for p in record["probes"]], record["diverged_at"]
    return RangeResult(probes, fit_range(probes, test, diverged_at), diverged_at, time.time() - started, settings)
