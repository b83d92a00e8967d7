"""The memory plan against a real DeepSpeed ZeRO-3 engine on one GPU.

    python bench/plan_check.py --model-size 1B [--trainable full|lora] [--teacher live|none]

Builds the OLMo architecture of that size (random weights: memory does not depend on them),
wraps it exactly as a trial does (``prepare_trainable``, ``cluster/deepspeed/zero3.json``,
bf16), runs a few gradient-difference steps on a forget and a retain micro-batch of
``--seq-len`` tokens (and the teacher's forward when asked), and prints the peak GPU memory
PyTorch allocated next to ``unlearn-search plan``'s total for ZeRO-3 on one GPU, and their ratio.
Needs a CUDA GPU. The optimizer is PyTorch's fused AdamW (same states as DeepSpeed's), so no
DeepSpeed op has to be compiled.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def main() -> None:
    from unlearn_search.quiet import silence_known_warnings

    silence_known_warnings()  # the known third-party lines, as the command line does
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-size", default="1B")
    parser.add_argument("--trainable", default="full", choices=["full", "lora"])
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--teacher", default="none", choices=["live", "none"])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/plan_check.py: needs a CUDA GPU (it measures GPU memory)")
    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29511",
    }.items():
        os.environ.setdefault(key, value)

    from types import SimpleNamespace

    import deepspeed
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from unlearn_search.models.trainable import prepare_trainable
    from unlearn_search.training.distributed import adapter_reference, deepspeed_config, teacher_config
    from unlearn_search.training.plan import GIB, count_parameters, model_config, plan_trial

    deepspeed.init_distributed(dist_backend="nccl")
    config = model_config(args.model_size)
    counts = count_parameters(config, f"OLMo {args.model_size}", args.trainable, lora_rank=args.lora_rank)
    # Steps only: the plan without the whole student that evaluation gathers (this bench runs none).
    stages = plan_trial(counts, 1, 80, args.trainable, args.teacher, 1, args.seq_len, eval_gather=False).stages
    planned = {s.stage: s for s in stages}

    # Built on the GPU, as a trial's loaded checkpoint would be handed to DeepSpeed; on one GPU
    # ZeRO-3 keeps every shard there.
    with torch.device("cuda"):
        student = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    student = prepare_trainable(student, args.trainable, lora_rank=args.lora_rank)
    ds_config = deepspeed_config(3, False, 1e-5, 0.0, 1.0, 1, torch.bfloat16)
    del ds_config["optimizer"]
    ds_config["zero_allow_untested_optimizer"] = True
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=True)
    engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer, config=ds_config)
    teacher = None
    if args.teacher == "live" and args.trainable == "lora":  # as a trial: the student's base, adapters off
        reference = adapter_reference(engine)
        teacher = lambda input_ids: SimpleNamespace(  # noqa: E731
            logits=reference(
                {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
            ).label_logprobs
        )
    elif args.teacher == "live":
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.requires_grad_(False)
        teacher, *_ = deepspeed.initialize(model=model, config=teacher_config(dtype=torch.bfloat16))
        teacher.eval()

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()  # training steps only: the plan is the steady state
    generator = torch.Generator().manual_seed(0)
    forget = torch.randint(0, config.vocab_size, (1, args.seq_len), generator=generator).cuda()
    retain = torch.randint(0, config.vocab_size, (1, args.seq_len), generator=generator).cuda()

    def nll(batch):
        logits = engine(input_ids=batch).logits
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch[:, 1:].flatten())

    for _ in range(args.steps):
        if teacher is not None:
            with torch.no_grad():
                torch.log_softmax(teacher(input_ids=retain).logits.float(), -1)
        loss = -nll(forget) + nll(retain)  # both graphs alive at once, as in gradient difference
        engine.backward(loss)
        engine.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / GIB
    plan = planned["ZeRO-3"]
    print(
        f"{counts.name}, {args.trainable}, teacher {args.teacher}, 1 GPU ({torch.cuda.get_device_name()}), "
        f"micro-batch 1 x {args.seq_len}"
    )
    print(
        f"planned ZeRO-3: states {plan.student_states_gib:.2f} + frozen {plan.frozen_gib:.2f} + activations "
        f"{plan.activations_gib:.2f} + teacher {plan.teacher_gib:.2f} = {plan.total_gib:.2f} GiB"
    )
    print(f"measured peak allocated: {peak:.2f} GiB; measured / planned = {peak / plan.total_gib:.2f}")


if __name__ == "__main__":
    main()
