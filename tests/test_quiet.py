"""The known third-party warnings are silenced at their real sources, and nothing else is."""

import warnings

import pytest
import torch

from unlearn_search.quiet import KNOWN_WARNINGS, silence_known_warnings


def _raised(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_warnings()
        try:
            call()
        except (RuntimeError, ValueError):  # no process group: the warning comes first
            pass
    return [str(w.message) for w in caught]


def _tiny_lora():
    from peft import LoraConfig, get_peft_model
    from transformers import OlmoConfig, OlmoForCausalLM

    config = OlmoConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
    )
    return get_peft_model(OlmoForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj"]))


@pytest.mark.parametrize(
    "call",
    [
        lambda: torch.distributed.all_gather_into_tensor(torch.zeros(2), torch.zeros(1)),
        lambda: torch.distributed.reduce_scatter_tensor(torch.zeros(1), torch.zeros(2)),
        lambda: _tiny_lora().base_model.model.is_gradient_checkpointing,
    ],
    ids=["all_gather_into_tensor", "reduce_scatter_tensor", "is_gradient_checkpointing"],
)
def test_each_known_warning_is_silenced_at_its_source(call):
    # Raised where the filters are off: the source still warns, with the text the entry matches.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call()
        except (RuntimeError, ValueError):
            pass
    assert any(w.category is FutureWarning for w in caught), [str(w.message) for w in caught]
    assert not [m for m in _raised(call) if "deprecated" in m]


def test_other_warnings_still_show():
    messages = _raised(
        lambda: (
            warnings.warn("our own warning", stacklevel=1),
            warnings.warn("`torch.load` is deprecated", FutureWarning, stacklevel=1),
        )
    )
    assert messages == ["our own warning", "`torch.load` is deprecated"]
    assert all(known.source and known.why for known in KNOWN_WARNINGS)
