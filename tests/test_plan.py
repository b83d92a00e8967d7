"""The 7B memory plan by hand, the `plan` command, and the cluster configs shipped in cluster/."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from unlearn_search.errors import UnlearnSearchError
from unlearn_search.training import plan as P

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
# OLMo 7B: untied 50304 x 4096 embedding and head, 32 layers of 4 attention and 3 MLP matrices.
EMBED = 50304 * 4096
P7B = 2 * EMBED + 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
LORA16 = 32 * 16 * (4 * (4096 + 4096) + 3 * (4096 + 11008))  # r * (in + out) per linear layer


@pytest.fixture(scope="module")
def counts_7b():
    config = P.model_config("7B")
    return {t: P.count_parameters(config, "OLMo 7B", t, lora_rank=16, last_k=8) for t in ("full", "lora", "last_k")}


def test_parameter_counts_are_exact(counts_7b):
    full, lora, last_k = counts_7b["full"], counts_7b["lora"], counts_7b["last_k"]
    assert full.parameters == P7B == 6_888_095_744 and full.trainable == P7B
    assert full.largest_layer == EMBED
    assert full.frozen == 0
    assert lora.parameters == P7B and lora.trainable == LORA16 == 39_976_960 and lora.frozen == P7B
    assert last_k.trainable == 8 * (4 * 4096 * 4096 + 3 * 4096 * 11008) and last_k.trained_layers == 8
    assert last_k.frozen == P7B - last_k.trainable


def test_full_fine_tuning_on_8_gpus_by_hand(counts_7b):
    plan = P.plan_trial(counts_7b["full"], 8, 80, "full", "live", micro_batch=1, seq_len=512, cluster_gpus=64)
    rows = {s.stage: s for s in plan.stages}
    # DeepSpeed's estimates: 2 + 18/N bytes per parameter at stage 2 (16-bit weights replicated),
    # 18/N plus one gathered layer (4 bytes per parameter) at stage 3, 20 bytes unpartitioned.
    assert rows["ZeRO-0"].student_states_gib * GIB == pytest.approx(20 * P7B)
    assert rows["ZeRO-2"].student_states_gib * GIB == pytest.approx(2 * P7B + 18 * P7B / 8, abs=1)
    assert rows["ZeRO-3"].student_states_gib * GIB == pytest.approx(4 * EMBED + 18 * P7B / 8, abs=1)
    assert rows["ZeRO-3 + CPU offload"].student_states_gib * GIB == pytest.approx(4 * EMBED)
    assert rows["ZeRO-3 + CPU offload"].cpu_per_node_gib * GIB == pytest.approx(18 * P7B * 1.5, rel=1e-9)
    activations = 2 * (34 * 512 * 4096 * 32 + 10 * 512 * 50304)
    teacher = 2 * P7B / 8 + 4 * EMBED + 4 * 512 * 50304
    # Under ZeRO-3 (no offload) every GPU gathers the whole bf16 student to evaluate it, after the
    # step's activations are freed: the larger of the two counts.
    evaluation = {"ZeRO-3": 2 * P7B}
    for row in plan.stages:
        assert row.activations_gib * GIB == pytest.approx(activations)
        assert row.evaluation_gib * GIB == pytest.approx(evaluation.get(row.stage, 0))
        assert row.teacher_gib * GIB == pytest.approx(teacher)
        assert row.total_gib * GIB == pytest.approx(
            (row.student_states_gib + row.frozen_gib) * GIB + max(activations, evaluation.get(row.stage, 0)) + teacher
        )
        assert row.fits == (row.total_gib <= 0.9 * 80)
    assert [s.fits for s in plan.stages] == [False, True, True, True]  # 135.5 GiB unpartitioned
    assert plan.recommended.stage == "ZeRO-2" and plan.trials_at_once == 8
    shards_only = P.plan_trial(counts_7b["full"], 8, 80, "full", "live", eval_gather=False)
    zero3 = {s.stage: s for s in shards_only.stages}["ZeRO-3"]
    assert zero3.evaluation_gib == 0 and zero3.total_gib * GIB == pytest.approx(
        rows["ZeRO-3"].total_gib * GIB - 2 * P7B + activations
    )


def test_evaluation_copy_decides_whether_zero3_fits(counts_7b):
    """A LoRA 7B trial on 8 GPUs of 16 GiB: its training fits under ZeRO-3 (shards, 4.7 GiB of
    activations), its evaluation's whole bf16 student (12.8 GiB) beside the shards does not, unless
    the trial evaluates on its shards (`eval_gather: false`)."""
    gathered = P.plan_trial(counts_7b["lora"], 8, 16, "lora", "cached")
    on_shards = P.plan_trial(counts_7b["lora"], 8, 16, "lora", "cached", eval_gather=False)
    zero3 = {s.stage: s for s in gathered.stages}["ZeRO-3"]
    assert zero3.evaluation_gib * GIB == pytest.approx(2 * (P7B + LORA16))
    assert not zero3.fits and {s.stage: s for s in on_shards.stages}["ZeRO-3"].fits


def test_lora_and_cached_teacher(counts_7b):
    live = P.plan_trial(counts_7b["lora"], 8, 80, "lora", "live")
    cached = P.plan_trial(counts_7b["lora"], 8, 80, "lora", "cached")
    zero3 = {s.stage: s for s in live.stages}["ZeRO-3"]
    assert zero3.frozen_gib * GIB == pytest.approx(2 * P7B / 8)  # the frozen bf16 base, sharded
    assert zero3.student_states_gib * GIB == pytest.approx(4 * EMBED + 18 * LORA16 / 8, abs=1)
    assert {s.stage: s for s in live.stages}["ZeRO-2"].frozen_gib * GIB == pytest.approx(2 * P7B)
    for a, b in zip(live.stages, cached.stages):
        assert b.teacher_gib == 0 and a.total_gib - b.total_gib == pytest.approx(a.teacher_gib)
    assert live.recommended.stage == "ZeRO-0"  # the base fits replicated: no partitioning needed


def test_fewest_gpus_that_fit(counts_7b):
    one = P.plan_trial(counts_7b["full"], 1, 16, "full", "live")
    assert one.recommended is None and "no stage fits" in P.verdict(one)
    smallest = P.smallest_fit(counts_7b["full"], 16, "full", "live", 1, 512)
    assert smallest.gpus_per_trial == 2 and smallest.recommended.stage == "ZeRO-3 + CPU offload"


def test_plan_reads_a_local_checkpoint(tiny_target):
    from unlearn_search.models import load_model

    counts = P.count_parameters(P.model_config(model_path=tiny_target), "tiny")
    assert counts.parameters == sum(p.numel() for p in load_model(tiny_target).parameters())


def test_plan_command_and_its_errors(tmp_path, capsys):
    from types import SimpleNamespace

    from unlearn_search.cli import main

    def plan(*args):  # the CLI's main, in this process: its exit code and what it printed
        code = main(["plan", *args])
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    done = plan(
        "--model-size",
        "7B",
        "--gpus-per-trial",
        "8",
        "--gpu-mem",
        "80",
        "--lora-rank",
        "16",
        "--teacher",
        "cached",
        "--cluster-gpus",
        "64",
    )
    assert done.returncode == 0, done.stderr
    assert "LoRA (40.0M trainable)" in done.stdout and "teacher cached" in done.stdout
    assert "fits: yes, with ZeRO-0" in done.stdout and "runs 8 trial(s) at once" in done.stdout
    assert "fewest GPUs per trial that fit: 1" in done.stdout
    bad = plan("--model-size", "7X")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
        "unlearn-search: error: --model-size '7X': expected one of 1B, 7B (or --model PATH)"
    )
    missing = plan("--model", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no config.json there" in missing.stderr.strip().splitlines()[-1]
    with pytest.raises(UnlearnSearchError, match=r"--gpus-per-trial 0: expected a positive integer"):
        P.plan_trial(P.ModelCounts("m", 10, 10, 0, 5, 1, 1, 4, 8), 0, 80)


def test_docs_memory_plan_is_what_the_command_prints():
    assert (REPO / "docs" / "memory_plan.md").read_text() == P.memory_plan_page()


# ------------------------------------------------------------------------- cluster/ configs


def test_cluster_launcher_yaml_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster" / "ray-cluster.aws.yaml").read_text())
    validate_config(prepare_config(config))  # raises on any schema violation
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    assert "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])


def test_kuberay_manifests_run_a_search_this_cli_accepts():
    from unlearn_search.cli import build_parser

    cluster = list(yaml.safe_load_all((REPO / "cluster" / "kuberay" / "raycluster.yaml").read_text()))
    assert [d["kind"] for d in cluster] == ["RayCluster", "PersistentVolumeClaim"]
    assert cluster[1]["spec"]["accessModes"] == ["ReadWriteMany"]
    job = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    for spec in (cluster[0]["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["authOptions"] == {"mode": "token"}
        workers = spec["workerGroupSpecs"][0]["template"]["spec"]
        assert workers["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
        mounts = {m["mountPath"] for m in workers["containers"][0]["volumeMounts"]}
        assert "/shared" in mounts
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "run_search.py"]
    args = build_parser().parse_args(["search", *argv[2:]])
    assert (REPO / args.space).is_file() and args.address == "auto" and args.output.startswith("/shared/")


def test_host_memory_per_worker_and_node(counts_7b):
    """GPU workers hold their base and, on rank 0, the largest checkpoint tensor while it is
    scattered; CPU workers also hold everything a GPU worker keeps on its GPU, in float32."""
    base = {device: P.WORKER_BASE_GIB[device] * GIB for device in P.DEVICES}
    gpu = {s.stage: s for s in P.plan_trial(counts_7b["lora"], 8, 80, "lora", "live").stages}["ZeRO-3"]
    assert gpu.host_per_worker_gib * GIB == pytest.approx(base["gpu"] + 4 * EMBED)
    assert gpu.host_per_node_gib * GIB == pytest.approx(8 * base["gpu"] + 4 * EMBED)
    cpu_plan = P.plan_trial(counts_7b["last_k"], 2, 24, "last_k", "live", device="cpu")
    cpu = {s.stage: s for s in cpu_plan.stages}["ZeRO-3"]
    assert cpu.frozen_gib * GIB == pytest.approx(4 * counts_7b["last_k"].frozen / 2)  # fp32, over 2 workers
    assert cpu.teacher_gib * GIB == pytest.approx(4 * P7B / 2 + 4 * EMBED + 4 * 512 * 50304)
    lora = {s.stage: s for s in P.plan_trial(counts_7b["lora"], 2, 24, "lora", "live", device="cpu").stages}
    assert lora["ZeRO-3"].teacher_gib * GIB == pytest.approx(4 * 512 * 50304)  # the base, adapters off
    assert cpu.host_per_worker_gib == pytest.approx(base["cpu"] / GIB + cpu.total_gib + 4 * EMBED / GIB)
    assert cpu.host_per_node_gib == pytest.approx(2 * (base["cpu"] / GIB + cpu.total_gib) + 4 * EMBED / GIB)
    with pytest.raises(P.UnlearnSearchError, match=r"--device 'tpu': expected one of gpu, cpu"):
        P.plan_trial(counts_7b["lora"], 2, 24, "lora", "live", device="tpu")
