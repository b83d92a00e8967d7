"""Loading a causal LM and its tokenizer from a local Hugging Face directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from unlearn_search.errors import UnlearnSearchError

TARGET_MANIFEST = "unlearn_target.json"
# What a model is loaded, trained and scored in. auto: bfloat16 on a GPU (as DeepSpeed trains
# and as the SemEval organizers' scorer loads the checkpoint), float32 on CPU.
DTYPES = ("auto", "bfloat16", "float32")
TARGET_EVALUATION = "target_evaluation.json"  # the target's own scores (`unlearn-search target build`)


def check_model_dir(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UnlearnSearchError(
            f"model path {str(path)!r} does not exist (expected a local Hugging Face model directory)"
        )
    if not (path / "config.json").exists():
        raise UnlearnSearchError(
            f"model path {str(path)!r} has no config.json "
            "(expected a Hugging Face checkpoint saved with save_pretrained)"
        )
    return path


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(check_model_dir(path), trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise UnlearnSearchError(f"tokenizer at {path} has no eos_token (expected one to end answers)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_device() -> str:
    """This process's accelerator: ``cuda`` where torch sees a GPU, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """The torch dtype of a ``DTYPES`` name on ``device`` (default: this process's)."""
    if isinstance(name, torch.dtype):
        return name
    name = name or "auto"
    if name not in DTYPES:
        raise UnlearnSearchError(f"dtype {name!r}: expected one of {', '.join(DTYPES)}")
    if name == "auto":
        on_gpu = torch.device(device or default_device()).type == "cuda"
        return torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def load_model(
    path: str | Path, dtype: str | torch.dtype | None = None, trust_remote_code: bool = False, device: str | None = None
):
    """The model in eval mode, in ``dtype`` (a ``DTYPES`` name; default float32), loaded straight
    onto ``device`` (default: CPU); ``trust_remote_code`` stays off unless the user turns it on."""
    path = check_model_dir(path)
    device = device or "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=resolve_dtype(dtype or "float32", device), device_map=device, trust_remote_code=trust_remote_code
    )
    model.eval()
    return model


def layer_count(path: str | Path) -> int:
    """The checkpoint's number of decoder layers, from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).num_hidden_layers


def copy_target_manifest(original: str | Path, model_dir: str | Path) -> None:
    """Give a model written from ``original`` the reference target's manifest, so that scoring it
    again scores the items the target memorized, not the whole benchmark."""
    manifest = Path(original) / TARGET_MANIFEST
    if manifest.exists():
        (Path(model_dir) / TARGET_MANIFEST).write_text(manifest.read_text())


def read_target_manifest(path: str | Path) -> dict | None:
    """The reference target's manifest (which items it memorized), or None for other checkpoints."""
    manifest = Path(path) / TARGET_MANIFEST
    return json.loads(manifest.read_text()) if manifest.exists() else None


def checkpoint_digest(directory: str | Path, digest) -> None:
    """Feed what identifies a checkpoint (its model and tokenizer files) into a hashlib ``digest``."""
    for path in sorted(Path(directory).iterdir()):
        if path.is_file() and path.suffix in (".json", ".safetensors", ".bin", ".model", ".txt"):
            digest.update(path.name.encode())
            stat = path.stat()
            if path.suffix in (".safetensors", ".bin") and stat.st_size > 256 * 2**20:
                # Hashing many GB per search costs minutes: size and mtime identify a checkpoint file.
                digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
            else:
                digest.update(path.read_bytes())
