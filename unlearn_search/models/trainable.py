"""Which parameters an unlearning run trains: all, LoRA adapters, the last k layers, or the
modules the method names (RMU: the MLP output projections up to its steered layer)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from unlearn_search.errors import UnlearnSearchError

TRAINABLE = ("full", "lora", "last_k", "method")
# For trainable=method: given the model's decoder layer count, the (layer index, module path
# inside that layer) pairs to train, or None when the method names none.
MethodModules = Callable[[int], Sequence[tuple[int, str]] | None]


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
    method_modules: MethodModules | None = None,
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
    if trainable == "method":
        return _train_method_modules(model, method_modules)
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


def _train_method_modules(model: nn.Module, method_modules: MethodModules | None) -> nn.Module:
    layers = decoder_layers(model)
    chosen = method_modules(len(layers)) if method_modules is not None else None
    if not chosen:
        raise UnlearnSearchError(
            "trainable=method: this method names no parameters of its own (expected full, lora or last_k)"
        )
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for index, path in chosen:
        try:
            module = layers[index].get_submodule(path)
        except AttributeError:
            raise UnlearnSearchError(
                f"trainable=method: decoder layer {index} has no module {path!r} "
                f"(expected a path such as mlp.down_proj)"
            ) from None
        for parameter in module.parameters():
            parameter.requires_grad_(True)
    return model


class LayerProbe:
    """The output of one decoder layer at each forward pass, kept by a forward hook (as RMU's
    authors read it): one layer's hidden states, from the pass that computes the logits, without
    holding every layer's (``output_hidden_states``)."""

    def __init__(self, model: nn.Module, layer: int):
        layers = decoder_layers(model)
        if not 0 <= layer < len(layers):
            raise UnlearnSearchError(f"layer={layer}: expected 0 to {len(layers) - 1} (the model's decoder layers)")
        self.layer = layer
        self._kept = None
        self._handle = layers[layer].register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self._kept = output[0] if isinstance(output, tuple) else output

    def take(self):
        """The hidden states ``[B, T, D]`` of the last forward pass (each pass's taken once)."""
        if self._kept is None:
            raise RuntimeError(f"LayerProbe: no forward pass through layer {self.layer} since the last take")
        kept, self._kept = self._kept, None
        return kept

    def remove(self) -> None:
        self._handle.remove()


def probe_layer(model: nn.Module, layer: int | None) -> LayerProbe | None:
    """A probe on ``layer`` of ``model``, or None for no layer."""
    return None if layer is None else LayerProbe(model, layer)


def plain_model(model: nn.Module) -> nn.Module:
    """A model to save as a normal checkpoint: LoRA adapters merged into the weights."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def count_trainable(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
