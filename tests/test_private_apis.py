"""The private parts of Ray, Optuna's Tune integration and DeepSpeed that the search and the
trials lean on, where no public API does the same. Each check fails loudly, naming what
changed, when an upgrade moves one: then the code that uses it must change too."""

import inspect

import pytest


def test_asha_brackets_keep_their_shape():
    """search.schedulers._BracketWithMargin subclasses Ray's ``_Bracket`` and rebuilds ASHA's
    ``_brackets`` with a margin (Ray's ASHA has no option for one)."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.schedulers.async_hyperband import _Bracket

    parameters = list(inspect.signature(_Bracket.__init__).parameters)
    assert parameters[:6] == ["self", "min_t", "max_t", "reduction_factor", "s", "stop_last_trials"], parameters
    assert callable(getattr(_Bracket, "cutoff", None)), "_Bracket.cutoff is gone"
    scheduler = ASHAScheduler(metric="m", mode="max", max_t=100, grace_period=10)
    assert scheduler._brackets and all(isinstance(b, _Bracket) for b in scheduler._brackets)
    assert scheduler._metric == "m" and scheduler._mode == "max"


def test_median_rule_and_timeout_stopper_internals():
    """TrainingMedianStopping shifts ``_best_result``; TimeBudget records ``_timeout_seconds``."""
    from ray.tune.schedulers import MedianStoppingRule
    from ray.tune.stopper import TimeoutStopper

    assert callable(getattr(MedianStoppingRule, "_best_result", None)), "MedianStoppingRule._best_result is gone"
    assert TimeoutStopper(7)._timeout_seconds == 7


def test_optuna_search_keeps_its_trials_by_tune_id():
    """The driver reaches each Tune trial's Optuna trial through ``OptunaSearch._ot_trials`` (to
    set its constraints and user attributes): Ray's wrapper offers no public way."""
    from ray.tune.search.optuna import OptunaSearch

    search = OptunaSearch(metric="m", mode="max")
    assert isinstance(getattr(search, "_ot_trials", None), dict), "OptunaSearch._ot_trials is gone"


def test_zero3_parameters_carry_their_full_size():
    """training.distributed.full_numel reads ``ds_numel`` of a ZeRO-3 partitioned parameter."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.partition_parameters import Init

    source = inspect.getsource(Init)
    assert "ds_numel" in source and "ds_tensor" in source, "ZeRO-3 parameters no longer carry ds_numel/ds_tensor"


def test_ray_train_reads_the_switches_the_job_sets():
    """``training.cluster.WORKER_ENV`` sets Ray Train's environment switches by name (Ray Train reads
    them from its private constants; no public option sets them)."""
    from ray.train.v2._internal import constants

    from unlearn_search.training.cluster import WORKER_ENV

    read = {
        constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR,
        constants.ENABLE_PRINT_PATCH_ENV_VAR,
        constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR,
    }
    set_by_us = {name for name in WORKER_ENV if name.startswith("RAY_TRAIN_")}
    assert set_by_us == read, f"Ray Train reads {sorted(read)}; the job sets {sorted(set_by_us)}"
