"""Which parameters an unlearning run trains: all, LoRA adapters, or the last k layers."""

from __future__ import annotations

from torch import nn

from unlearn_search.errors import UnlearnSearchError

TRAINABLE = ("full", "lora", "last_k")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(base, "layers", None)
    if layers is None:
        raise UnlearnSearchError(f"{type(model).__name__}: no decoder .layers found (needed for trainable=last_k)")
    return layers


def prepare_trainable(
    model: nn.Module,
    trainable: str = "full",
    last_k: int = 8,
    lora_rank: int = 16,
    lora_alpha: float = 32,
    lora_dropout: float = 0.0,
    lora_targets: str | list[str] = "all-linear",
):
    """The model ready to train: LoRA-wrapped, or with all but the chosen parameters frozen."""
    if trainable not in TRAINABLE:
        raise UnlearnSearchError(f"trainable {trainable!r}: expected one of {', '.join(TRAINABLE)}")
    if trainable == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    if trainable == "last_k":
        layers = decoder_layers(model)
        if not 1 <= last_k <= len(layers):
            raise UnlearnSearchError(f"last_k={last_k}: expected 1 to {len(layers)} (the model's layer count)")
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for layer in layers[-last_k:]:
            for parameter in layer.parameters():
                parameter.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    if lora_rank < 1:
        raise UnlearnSearchError(f"lora_rank={lora_rank}: expected a positive integer")
    config = LoraConfig(
        r=int(lora_rank),
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=lora_targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def plain_model(model: nn.Module) -> nn.Module:
    """A model to save as a normal checkpoint: LoRA adapters merged into the weights."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def count_trainable(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
