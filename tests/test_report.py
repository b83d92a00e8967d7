"""The search report: its tables from hand-made results, and the page as headless Chromium renders it."""

from __future__ import annotations

import math
import os
import shutil

import optuna
import pytest

from unlearn_search.tracking import study_plots
from unlearn_search.tracking.report import PER_TASK_PLOT, per_task_scores, trials_table, write_report

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# CI installs Chromium and sets this, so that a missing browser fails there instead of skipping.
REQUIRE_BROWSER = os.environ.get("UNLEARN_SEARCH_REQUIRE_BROWSER") == "1"


def evaluation(forget: float, retain: float, aggregate: float) -> dict:
    """An ``evaluation_results.json`` with two tasks; Task2's forget set has no QA item."""
    task = {"regurgitation-score": forget, "knowledge-score": forget}
    return {
        "forget-set": {"Task1": task, "Task2": {"regurgitation-score": forget}, "overall-regurgitation-score": forget},
        "retain-set": {
            "Task1": {"regurgitation-score": retain, "knowledge-score": retain},
            "Task2": {"regurgitation-score": retain, "knowledge-score": retain},
        },
        "aggregate-score": aggregate,
        "harmonic-mean-task-aggregate": 0.5,
        "mia_final_score": 0.2,
        "mia_loss_acc": 0.9,
        "mmlu_average": 0.25,
        "mia_attacks": {"min_k": {"auc": 0.8, "score": 0.4}, "reference": {"auc": 0.5, "score": 1.0}},
    }


def test_per_task_scores_read_each_term_and_mark_a_missing_one():
    scores = per_task_scores(evaluation(0.1, 0.9, 0.4))
    assert list(scores) == ["Task1", "Task2"]
    assert scores["Task1"] == {
        "forget regurgitation": 0.1,
        "forget knowledge": 0.1,
        "retain regurgitation": 0.9,
        "retain knowledge": 0.9,
    }
    assert math.isnan(scores["Task2"]["forget knowledge"])


def test_the_trials_table_has_a_row_per_trial_and_marks_the_best():
    rows = [
        {"trial_id": "a", "status": "completed", "lr": 1e-3, "aggregate": 0.31, "seconds": 12.0},
        {"trial_id": "b", "status": "pruned", "lr": 3e-4, "aggregate": None},
        {"trial_id": "<c>", "status": "failed", "lr": 2e-3},
    ]
    table = trials_table(rows, ["lr"], "a")
    assert table.count("<tr") == 4  # the header and three trials
    assert table.count('class="best"') == 1 and '<tr class="best"><td class="text">a</td>' in table
    assert "&lt;c&gt;" in table and "<c>" not in table  # cells are escaped


def study_with_trials(storage: str) -> None:
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    study.optimize(
        lambda t: -((t.suggest_float("lr", 1e-4, 1e-2, log=True) - 3e-3) ** 2) + 0.01 * t.suggest_int("epochs", 1, 4),
        n_trials=6,
    )


def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        if REQUIRE_BROWSER:
            pytest.fail("UNLEARN_SEARCH_REQUIRE_BROWSER=1 but chromium or chromedriver is not on PATH")
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # As root in a sandbox with no network: no sandbox, no GPU, no background connections.
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def test_the_report_renders_in_chromium_with_every_image_loaded(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study_with_trials(storage)
    plots = study_plots(storage, "s", tmp_path / "plots", ["aggregate"])
    assert plots, "the study's plots were not drawn"
    rows = [{"trial_id": f"t{i}", "status": "completed", "lr": 1e-3 * (i + 1), "aggregate": 0.1 * i} for i in range(3)]
    report = write_report(
        tmp_path,
        title="Search test",
        rows=rows,
        params=["lr"],
        best=rows[2],
        best_evaluation=evaluation(0.1, 0.9, 0.4),
        references={"original": evaluation(1.0, 1.0, 0.08), "retrained": evaluation(0.05, 0.95, 0.69)},
        plots=plots,
    )
    assert (tmp_path / "plots" / f"{PER_TASK_PLOT}.png").is_file()
    driver = browser()
    try:
        driver.get(report.as_uri())
        images = driver.execute_script(
            "return [...document.images].map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]);"
        )
        trial_rows = driver.execute_script("return document.querySelectorAll('table')[0].tBodies[0].rows.length;")
        best_row = driver.execute_script("return document.querySelector('tr.best td').textContent;")
        scores = driver.execute_script(
            "return [...document.querySelectorAll('table')[1].rows].map(r => [...r.cells].map(c => c.textContent));"
        )
    finally:
        driver.quit()
    assert len(images) == len(plots) + 1  # the study's plots and the per-task chart
    assert all(complete and width > 0 for _, complete, width in images), images
    assert f"plots/{PER_TASK_PLOT}.png" in [src for src, _, _ in images]
    assert trial_rows == 3 and best_row == "t2"
    # The best trial beside both references, each attack's AUC a row (a missing one shown as -).
    assert scores[0] == ["", "best trial", "original", "retrained"]
    rows_by_label = {row[0]: row[1:] for row in scores[1:]}
    assert rows_by_label["aggregate"] == ["0.4", "0.08", "0.69"]
    assert rows_by_label["MIA AUC: min k"] == ["0.8"] * 3 and rows_by_label["MIA AUC: zlib"] == ["-", "-", "-"]


def test_a_search_without_a_best_trial_says_so(tmp_path):
    rows = [{"trial_id": "a", "status": "failed"}]
    report = write_report(
        tmp_path, title="t", rows=rows, params=[], best=None, best_evaluation=None, references=None, plots=[]
    )
    text = report.read_text()
    assert "no best trial" in text and "<img" not in text
