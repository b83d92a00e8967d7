"""A real two-node Ray cluster on this machine (`ray start --head` plus `ray start --address`), a
search submitted to it with `--address`, and a trial whose loss diverges on the way.

Each node has 2 CPUs; each trial's 2 workers (1 CPU each) are packed on one node; the first two
trials start together, so they can only run on different nodes. The third start point (lr 1e6)
diverges: it must end as a failed trial with its reason in the results, Optuna and MLflow, while
the two others complete.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "tests" / "spaces" / "two_node.yaml"
OBJECT_STORE = str(300 * 2**20)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(["ray", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """(address, {node_id: resources}); both nodes are stopped at the end, whatever happened.

    Token authentication on, as every node and driver of a real cluster should run it: one
    token, one mode, everywhere (here through the environment the subprocesses inherit).
    """
    token = tmp_path_factory.mktemp("ray") / "auth_token"
    token.write_text(secrets.token_hex(32))
    port = _free_port()
    address = f"127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "token")
        env.setenv("RAY_AUTH_TOKEN_PATH", str(token))
        try:
            head = _ray(
                "start",
                "--head",
                "--node-ip-address",
                "127.0.0.1",
                "--port",
                str(port),
                "--num-cpus",
                "2",
                "--num-gpus",
                "0",
                "--object-store-memory",
                OBJECT_STORE,
                "--include-dashboard",
                "false",
                "--disable-usage-stats",
            )
            assert head.returncode == 0, head.stdout[-2000:] + head.stderr[-2000:]
            worker = _ray(
                "start",
                "--address",
                address,
                "--node-ip-address",
                "127.0.0.1",
                "--num-cpus",
                "2",
                "--num-gpus",
                "0",
                "--object-store-memory",
                OBJECT_STORE,
                "--resources",
                '{"second_node": 1}',
                "--disable-usage-stats",
            )
            assert worker.returncode == 0, worker.stdout[-2000:] + worker.stderr[-2000:]
            probe = _python(
                f"import json, ray; ray.init(address={address!r}, log_to_driver=False); "
                "print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))"
            )
            nodes = json.loads(probe.strip().splitlines()[-1])
            assert len(nodes) == 2, nodes
            yield address, nodes
        finally:
            _ray("stop", "--force")


def _python(code: str, timeout: float = 300) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


SPREAD_PROBE = """
import json, ray, ray.train
from ray.train.torch import TorchTrainer
from unlearn_search.training.trial import Resources, scaling_config

def where(config):
    ray.train.report({"node_id": ray.get_runtime_context().get_node_id()})

class Log(ray.train.UserCallback):  # runs in the Train controller: it writes where every worker ran
    def __init__(self, path):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as handle:
            handle.writelines(m["node_id"] + "\\n" for m in metrics)

ray.init(address=%(address)r, log_to_driver=False)
log = %(storage)r + "/spread.nodes"
trainer = TorchTrainer(where, scaling_config=scaling_config(Resources(workers=2, placement="spread")),
                       run_config=ray.train.RunConfig(name="spread", storage_path=%(storage)r, callbacks=[Log(log)]))
trainer.fit()
print(json.dumps(open(log).read().split()))
"""


@pytest.mark.slow
def test_placement_spreads_a_trials_workers(two_node_cluster, tmp_path):
    """``placement: spread`` puts a trial's two workers on two nodes (``pack``, the search's below,
    on one)."""
    address, nodes = two_node_cluster
    placed = json.loads(_python(SPREAD_PROBE % {"address": address, "storage": str(tmp_path)}).strip().splitlines()[-1])
    assert sorted(placed) == sorted(nodes), placed  # one worker on each node


@pytest.mark.slow
def test_search_on_two_node_cluster_uses_both_nodes_and_survives_a_diverging_trial(
    two_node_cluster, tmp_path, tiny_target, data_paths
):
    import optuna
    from mlflow.tracking import MlflowClient

    address, nodes = two_node_cluster
    second = next(node for node, resources in nodes.items() if resources.get("second_node"))
    output = tmp_path / "search"
    command = [
        sys.executable,
        str(REPO / "run_search.py"),
        "--space",
        str(SPACE),
        "--model",
        str(tiny_target),
        "--data",
        str(data_paths.root),
        "--output",
        str(output),
        "--address",
        address,
        "--final-mmlu-limit",
        "1",
        "--verbose",
        "0",
        "--final-split",
        "train",
        "--final-max-new-tokens",
        "32",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=1500)
    log = done.stdout + done.stderr
    (tmp_path / "search.log").write_text(log)
    assert done.returncode == 0, log[-5000:]

    rows = {round(r["lr"], 6): r for r in json.loads((output / "trials.json").read_text())}
    assert len(rows) == 3, rows
    # The diverging trial: failed, with its reason, and the search went on.
    diverged = rows[1e6]
    assert diverged["status"] == "failed" and "diverged" in diverged["error"], diverged
    assert "loss is nan" in diverged["error"] or "loss is inf" in diverged["error"], diverged["error"]
    completed = [rows[5e-4], rows[3e-4]]
    assert all(r["status"] == "completed" and 0.0 <= r["aggregate"] <= 1.0 for r in completed), completed

    # Packed: each trial's two workers on one node; run together, the two trials used both nodes.
    placed = [r["worker_nodes"].split(",") for r in completed]
    assert all(len(p) == 1 for p in placed), placed
    assert {p[0] for p in placed} == set(nodes), (placed, nodes)
    assert second in {p[0] for p in placed}

    study = optuna.load_study(study_name="two_node", storage=f"sqlite:///{output / 'optuna.db'}")
    states = {round(t.params["lr"], 6): t.state for t in study.trials}
    assert states == {
        1e6: optuna.trial.TrialState.FAIL,
        5e-4: optuna.trial.TrialState.COMPLETE,
        3e-4: optuna.trial.TrialState.COMPLETE,
    }, states

    client = MlflowClient(tracking_uri=f"sqlite:///{output / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("unlearn-search/two_node").experiment_id])
    failed = [r for r in runs if r.data.tags.get("trial_id") == diverged["trial_id"]]
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
    assert "diverged" in failed[0].data.tags["failure_reason"]
    assert json.loads((output / "best" / "trial.json").read_text())["trial_id"] != diverged["trial_id"]
