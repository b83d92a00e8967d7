"""A tracking server that dies mid-search costs the search nothing: the same search run twice,
once with a live MLflow server and once with the server killed after the first trial finished.

    python bench/mlflow_outage.py [--space tests/spaces/tiny_gd.yaml] [--model tiny] [--trials 3]

Prints both wall times and their ratio (target, issue 29: at most 1.2), and the logging calls the
second search could not make, read back from its ``mlflow_pending.jsonl`` and checked to be in
the order they were made. Both searches use the same sampler seed, so they run the same trials;
the ratio still varies with how long the trials themselves take (a few percent on 2 CPU cores).
About 6 minutes on the tiny target.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(directory: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{directory / 'server.db'}",
            "--artifacts-destination",
            str(directory / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=5):
                return process, uri
        except OSError as error:
            if process.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the MLflow server did not start on {uri}") from error
            time.sleep(1)


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def completed_trials(study_db: Path) -> int:
    if not study_db.exists():
        return 0
    try:
        with sqlite3.connect(study_db) as connection:
            return connection.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.OperationalError:  # the study's tables are not created yet
        return 0


def run_search(args, output: Path, uri: str, server: subprocess.Popen, kill_after: int | None) -> float:
    """One search to the end; with ``kill_after``, the server is killed once that many trials finished."""
    command = [
        sys.executable,
        str(REPO / "run_search.py"),
        "--space",
        args.space,
        "--model",
        args.model,
        "--output",
        str(output),
        "--tracking-uri",
        uri,
        "--num-samples",
        str(args.trials),
        "--final-mmlu-limit",
        "1",
        "--final-split",
        "train",
        "--final-max-new-tokens",
        "32",
        "--verbose",
        "0",
    ]
    if args.data:
        command += ["--data", args.data]
    started = time.time()
    with open(output.with_suffix(".log"), "w") as log:
        search = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        while search.poll() is None:
            if (
                kill_after is not None
                and server.poll() is None
                and completed_trials(output / "optuna.db") >= kill_after
            ):
                stop_server(server)
                print(f"  MLflow server killed after {kill_after} finished trial(s), {time.time() - started:.0f} s in")
            time.sleep(1)
    if search.returncode != 0:
        raise SystemExit(f"the search in {output} failed (exit {search.returncode}): see {output.with_suffix('.log')}")
    return time.time() - started


def check_order(calls: list[dict]) -> list[str]:
    """What is out of order among the kept calls: a trial's events after its end, or metrics
    whose time goes back."""
    problems, ended, last_time = [], set(), {}
    for index, call in enumerate(calls):
        trial = call.get("trial_id")
        if trial in ended:
            problems.append(f"call {index} ({call['what']}) for trial {trial} after its end")
        if call["what"] == "trial_end":
            ended.add(trial)
        if call["what"] == "metrics":
            if call["time"] < last_time.get(trial, 0.0):
                problems.append(f"call {index}: metrics of trial {trial} earlier than the one before")
            last_time[trial] = call["time"]
    return problems


def main() -> None:
    from unlearn_search.quiet import silence_known_warnings

    silence_known_warnings()  # the known third-party lines, as the command line does
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default=str(REPO / "tests" / "spaces" / "tiny_gd.yaml"))
    parser.add_argument("--model", default="tiny", help="a reference target preset or a checkpoint path")
    parser.add_argument("--data", default=None)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    if args.trials < 2:
        raise SystemExit(f"--trials {args.trials}: expected at least 2 (the server dies after the first)")

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        walls = {}
        for name, kill_after in (("live", None), ("killed", 1)):
            (scratch / name).mkdir()
            server, uri = start_server(scratch / name)
            print(f"search with the MLflow server {name} ...")
            try:
                walls[name] = run_search(args, scratch / name / "search", uri, server, kill_after)
            finally:
                stop_server(server)
            print(f"  {walls[name]:.0f} s")
        pending = scratch / "killed" / "search" / "mlflow_pending.jsonl"
        calls = [json.loads(line) for line in pending.read_text().splitlines()] if pending.exists() else []
        rows = json.loads((scratch / "killed" / "search" / "trials.json").read_text())

    print(
        f"\nwall time, live server: {walls['live']:.0f} s; server killed after the first trial: {walls['killed']:.0f} s"
    )
    print(f"ratio: {walls['killed'] / walls['live']:.2f} (target <= 1.2)")
    print(f"trials finished with the server dead: {sum(r['status'] == 'completed' for r in rows)} of {len(rows)}")
    kinds = {}
    for call in calls:
        kinds[call["what"]] = kinds.get(call["what"], 0) + 1
    print(
        f"logging calls kept in mlflow_pending.jsonl: {len(calls)} ("
        + ", ".join(f"{count} {what}" for what, count in kinds.items())
        + ")"
    )
    problems = check_order(calls)
    print("in the order they were made" if not problems else "OUT OF ORDER: " + "; ".join(problems))


if __name__ == "__main__":
    main()
