"""The lr range test's pure parts: the ramp, the probe items, the curve's reading, the space's key."""

from __future__ import annotations

import math

import pytest
import yaml
from test_space import REPO

from unlearn_search.errors import UnlearnSearchError
from unlearn_search.methods.schedules import Step
from unlearn_search.search.lr_range import (
    FittedRange,
    Probe,
    RangeTest,
    fit_range,
    fitted_param,
    moved_starts,
    probe_items,
    ramp,
)
from unlearn_search.search.space import parse_space


def test_the_ramp_rises_geometrically_over_the_steps_with_a_probe_boundary_every_few_and_no_restart():
    planned = [
        Step((i,), (10 + i,), restart=i == 0, boundary="chunk 1" if i == 2 else None, lr_scale=0.5) for i in range(3)
    ]
    test = RangeTest(steps=7, low=1e-6, high=1e-0, probe_every=3)
    steps = ramp(planned, test)
    assert [s.forget for s in steps] == [(0,), (1,), (2,), (0,), (1,), (2,), (0,)]  # cycled
    # lr_i = low * (high / low) ** (i / (n - 1)): one decade per step here, as a scale of low.
    assert [s.lr_scale * test.low for s in steps] == pytest.approx([10.0 ** (k - 6) for k in range(7)])
    assert [s.boundary for s in steps] == [None, None, "probe 3", None, None, "probe 6", "probe 7"]
    assert not any(s.restart for s in steps)


def test_the_probe_scores_the_first_forget_items_trained_and_retain_items_held_out():
    steps = [Step((4, 2), (0, 1)), Step((2, 7), (3,))]
    assert probe_items(steps, n_retain=6, count=2) == ((4, 2), (2, 4))
    assert probe_items(steps, n_retain=4, count=3) == ((4, 2, 7), (2, 0, 1))  # too few held out: trained ones too


def _probes(lrs, forget, retain):
    return [Probe(i, lr, f, r) for i, (lr, f, r) in enumerate(zip(lrs, forget, retain))]


LRS = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]  # the first: before any step
TEST = RangeTest(steps=5, low=1e-6, high=1e-1, probe_every=1, rise=1.0, below=1.5, above=0.5)


def test_the_onset_is_the_first_lr_where_the_forget_nll_grew_e_fold_for_two_probes():
    # rise 1: the NLL times e = 2.72 (0.272 here). A one-probe blip at 1e-5 does not count; from 1e-3 on it holds.
    fitted = fit_range(_probes(LRS, [0.1, 0.5, 0.2, 0.4, 2.5, 8.0], [0.1] * 6), TEST)
    assert fitted.onset == pytest.approx(1e-3)
    assert (fitted.low, fitted.high) == pytest.approx((1e-3 * 10**-1.5, 1e-3 * 10**0.5))
    assert fitted.capped_by is None


def test_a_retain_rise_or_a_divergence_caps_the_range_but_never_below_the_onset():
    forget, wide = [0.1, 0.1, 0.1, 1.5, 3.0, 9.0], RangeTest(**{**TEST.__dict__, "above": 1.5})
    capped = fit_range(_probes(LRS, forget, [0.1, 0.1, 0.1, 0.2, 1.4, 5.0]), wide)
    assert capped.onset == pytest.approx(1e-3) and capped.high == pytest.approx(1e-2)
    assert capped.capped_by == "retain"
    early = fit_range(_probes(LRS, forget, [0.1, 0.1, 1.5, 1.6, 1.4, 5.0]), wide)
    assert early.high == pytest.approx(1e-3)  # the retain rose before the onset: the range still holds it
    # Diverged at step 5 (1-based): step 4, at lr_at(3) = 1e-6 * 1e5 ** (3 / 4), was the last finite one.
    diverged = fit_range(_probes(LRS, forget, [0.1] * 6), wide, diverged_at=5)
    assert diverged.high == pytest.approx(10**-2.25) and diverged.capped_by == "divergence"


def test_no_rise_puts_the_range_at_the_top_of_the_test_and_the_range_stays_inside_the_test():
    flat = fit_range(_probes(LRS, [0.1] * 6, [0.1] * 6), TEST)
    assert flat.onset is None
    assert (flat.low, flat.high) == pytest.approx((1e-1 * 10**-1.5, 1e-1))  # above the test: clipped to high
    low = fit_range(_probes(LRS, [0.1, 1.5, 1.6, 2, 3, 4], [0.1] * 6), TEST)
    assert low.onset == pytest.approx(1e-5) and low.low == pytest.approx(1e-6)


def test_the_fitted_range_replaces_the_lr_bounds_and_moves_starts_into_it():
    space = parse_space(yaml.safe_load((REPO / "search_spaces" / "sugd.yaml").read_text()))
    fitted = FittedRange(onset=1e-3, low=3e-5, high=3e-3)
    lr = fitted_param(next(p for p in space.params if p.name == "lr"), fitted)
    assert (lr.low, lr.high, lr.distribution, lr.log) == (3e-5, 3e-3, "float", True)
    starts, notes = moved_starts([{"lr": 1e-6, "last_k": 2}, {"lr": 1e-4}, {"lr": 0.5}], fitted)
    assert [s["lr"] for s in starts] == pytest.approx([3e-4, 1e-4, 3e-4]) and starts[0]["last_k"] == 2
    assert notes == [
        "start 1: lr 1e-06 is outside this model's range; it starts at 0.0003",
        "start 3: lr 0.5 is outside this model's range; it starts at 0.0003",
    ]


def test_the_shipped_default_space_runs_the_range_test_over_its_lr_and_starts_only_from_published_values():
    space = parse_space(yaml.safe_load((REPO / "search_spaces" / "sugd.yaml").read_text()))
    lr = next(p for p in space.params if p.name == "lr")
    assert (space.lr_range_test.low, space.lr_range_test.high) == (lr.low, lr.high)
    assert space.starts == (
        {
            "lr": 1e-5,
            "chunk_size": 32,
            "positive_ratio": 7,
            "positive_factor": 0.5,
            "epochs_per_chunk": 4,
            "trainable": "last_k",
            "last_k": 2,
        },
    )


def _space(**changes):
    raw = yaml.safe_load((REPO / "search_spaces" / "sugd.yaml").read_text())
    raw.update(changes)
    return raw


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lr_range_test": {"low": 1e-5}}, "lr_range_test.low: the test ramps over params.lr's range (set low there)"),
        ({"lr_range_test": {"steps": 1}}, "lr_range_test.steps: expected an integer >= 2 (got 1)"),
        ({"lr_range_test": {"probe_every": 60}}, "lr_range_test.probe_every: expected an integer from 1 to steps (48)"),
        ({"lr_range_test": {"rise": 0}}, "lr_range_test.rise: expected a value > 0 (got 0)"),
        ({"lr_range_test": {"rise": "x"}}, "lr_range_test.rise: expected a finite number (got 'x')"),
        ({"lr_range_test": {"step": 8}}, "lr_range_test.step: unknown key (expected one of steps,"),
        ({"lr_range_test": {}, "starts": []}, "lr_range_test: runs the first start point (expected at least one"),
    ],
)
def test_a_bad_range_test_block_gets_one_clear_line(change, message):
    with pytest.raises(UnlearnSearchError) as error:
        parse_space(_space(**change))
    assert str(error.value).startswith(message), str(error.value)


def test_the_range_test_needs_a_log_float_lr():
    raw = _space()
    raw["params"]["lr"] = {"distribution": "float", "low": 1e-5, "high": 1e-3}
    with pytest.raises(
        UnlearnSearchError,
        match=r"^lr_range_test: fits the searched learning rate \(expected params.lr "
        r"with distribution float, log true\)$",
    ):
        parse_space(raw)


def test_range_test_bounds_check_themselves():
    with pytest.raises(UnlearnSearchError, match=r"^lr_range_test.high: expected a value > low"):
        RangeTest(low=1e-3, high=1e-4)
    assert RangeTest(steps=3, low=1e-4, high=1e-2, probe_every=1).lr_at(1) == pytest.approx(1e-3)
    assert math.isclose(RangeTest().lr_at(47), 1e-1)
