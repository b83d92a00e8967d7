"""The GPU path's decisions, checked on CPU: each worker's accelerator, dtype and the loads and
gathers that keep a 7B model sharded."""

import json
from pathlib import Path

import pytest
import torch

from unlearn_search.models.loading import resolve_dtype
from unlearn_search.training.trial import accelerator_environment


@pytest.mark.parametrize("driver_env", [{}, {"DS_ACCELERATOR": "cpu"}, {"DS_ACCELERATOR": "cuda"}])
def test_a_worker_with_a_gpu_never_gets_the_cpu_accelerator(driver_env):
    """Whatever the driver or the job's runtime environment put there (a CPU head node)."""
    on_gpu = accelerator_environment({**driver_env, "PATH": "/bin"}, has_gpu=True)
    assert on_gpu.get("DS_ACCELERATOR") != "cpu" and on_gpu["PATH"] == "/bin"
    assert accelerator_environment(driver_env, has_gpu=False)["DS_ACCELERATOR"] == "cpu"


def test_the_job_environment_names_no_accelerator():
    """init_ray's runtime environment reaches every worker: it must not carry the driver's devices."""
    import ray

    from unlearn_search.training.cluster import init_ray

    assert not ray.is_initialized()
    init_ray(num_cpus=1)
    try:
        env = ray.get_runtime_context().runtime_env.get("env_vars", {})
        assert "DS_ACCELERATOR" not in env and env["TOKENIZERS_PARALLELISM"] == "false"
    finally:
        ray.shutdown()


def test_dtype_auto_is_bf16_on_a_gpu_and_fp32_on_cpu():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("float32", "cuda") == torch.float32
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert resolve_dtype("auto", "cuda") == torch.bfloat16
    from unlearn_search.errors import UnlearnSearchError

    with pytest.raises(UnlearnSearchError, match=r"dtype 'fp8': expected one of auto, bfloat16, float32"):
        resolve_dtype("fp8")


def test_a_bad_dtype_setting_is_refused_before_any_worker_starts():
    from unlearn_search.errors import UnlearnSearchError
    from unlearn_search.training.config import trial_config

    assert trial_config({"dtype": "bfloat16"}).dtype == "bfloat16"
    with pytest.raises(UnlearnSearchError, match=r"^dtype 'half': expected one of auto, bfloat16, float32$"):
        trial_config({"dtype": "half"})


def _load_and_gather(rank: int, model_dir: str, init_file: str, out: str) -> None:
    import os

    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    import deepspeed
    import torch.distributed as dist
    from safetensors.torch import load_file

    from unlearn_search.models.trainable import prepare_trainable
    from unlearn_search.training.distributed import gather_trained, load_partitioned, safetensors_index, teacher_config

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model, handle = load_partitioned(model_dir, teacher_config(dtype=torch.bfloat16), torch.bfloat16)
    saved = load_file(next(iter(set(safetensors_index(Path(model_dir)).values()))))
    held = sum(p.ds_tensor.numel() for p in model.parameters())  # this rank's partitions
    total = sum(p.ds_numel for p in model.parameters())
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        exact = all(torch.equal(p.data, saved[name].to(torch.bfloat16)) for name, p in model.named_parameters())
        dtypes = {str(p.dtype) for p in model.parameters()}
    model = prepare_trainable(model, "last_k", last_k=1)
    state = gather_trained(model, rank, group_bytes=1 << 16)
    trained = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    Path(out, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "exact": exact,
                "dtypes": sorted(dtypes),
                "held": held,
                "total": total,
                "gathered": None if state is None else sorted(state),
                "trained": trained,
                "whole": None if state is None else all(t.numel() > 0 for t in state.values()),
            }
        )
    )
    dist.barrier()
    # Leave without the C++ teardown: DeepSpeed's shared-memory communicator can abort a child
    # at interpreter exit ("terminate called without an active exception") after all is written.
    os._exit(0)


def test_zero3_loading_partitions_the_checkpoint_and_a_boundary_gathers_only_trained_weights(tiny_target, tmp_path):
    """Two real gloo ranks: the checkpoint lands in ZeRO-3 partitions, exact, in the asked dtype,
    each rank holding half; gather_trained brings rank 0 the trained layer's weights, whole, and
    nothing else (the frozen ones never move)."""
    import torch.multiprocessing as mp

    mp.spawn(_load_and_gather, args=(str(tiny_target), str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["exact"] and rank["dtypes"] == ["torch.bfloat16"]
        assert rank["held"] <= rank["total"] / 2 + 1024  # half each (a partition pads to the world size)
    assert ranks[0]["gathered"] == ranks[0]["trained"] and ranks[0]["whole"]
    assert all(name.startswith("model.layers.3.") for name in ranks[0]["trained"])  # the last of tiny's 4
    assert ranks[1]["gathered"] is None


def test_trained_parameters_go_in_groups_under_the_byte_limit():
    from unlearn_search.training.distributed import byte_groups

    named = [(str(i), torch.nn.Parameter(torch.zeros(n))) for i, n in enumerate([10, 10, 30, 5, 5])]
    groups = byte_groups(named, limit=4 * 20)  # float32: 80 bytes
    assert [[name for name, _ in g] for g in groups] == [["0", "1"], ["2"], ["3", "4"]]


def test_a_lora_students_teacher_is_its_base_with_the_adapters_off(tiny_target):
    """No second copy for LoRA: the frozen base is the original model, whatever the adapters learned."""
    from types import SimpleNamespace

    from unlearn_search.methods import Reference
    from unlearn_search.models import load_model
    from unlearn_search.models.trainable import prepare_trainable
    from unlearn_search.training.distributed import adapter_reference

    original = load_model(tiny_target)
    student = prepare_trainable(load_model(tiny_target), "lora", lora_rank=4)
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # trained adapters: the student now differs from the original
    ids = torch.randint(0, original.config.vocab_size, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    got = adapter_reference(SimpleNamespace(module=student, device="cpu"))(batch)
    with torch.no_grad():
        want = Reference.from_logits(original(input_ids=ids, attention_mask=batch["attention_mask"]).logits, ids)
        moved = Reference.from_logits(student(input_ids=ids, attention_mask=batch["attention_mask"]).logits, ids)
    assert torch.allclose(got.label_logprobs, want.label_logprobs, atol=1e-5)
    assert not torch.allclose(moved.label_logprobs, want.label_logprobs, atol=1e-3)
