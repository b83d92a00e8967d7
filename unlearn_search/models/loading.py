"""Loading a causal LM and its tokenizer from a local Hugging Face directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from unlearn_search.errors import UnlearnSearchError

TARGET_MANIFEST = "unlearn_target.json"
TARGET_EVALUATION = "target_evaluation.json"  # the target's own scores (`unlearn-search target build`)


def check_model_dir(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UnlearnSearchError(f"model path {str(path)!r} does not exist (expected a local Hugging Face model directory)")
    if not (path / "config.json").exists():
        raise UnlearnSearchError(f"model path {str(path)!r} has no config.json (expected a Hugging Face checkpoint saved with save_pretrained)")
    return path


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(check_model_dir(path), trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise UnlearnSearchError(f"tokenizer at {path} has no eos_token (expected one to end answers)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str | Path, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """The model in eval mode; ``trust_remote_code`` stays off unless the user turns it on."""
    path = check_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code)
    model.eval()
    return model


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
