"""Typed, validated options of `generate` (`GenerateJob`) and the sampling checks the runtime shares.

Pure Python (no torch) so the CLI can build its options from these fields before anything heavy loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import MoEConvertError
from ..options import check_seed, check_types, option


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, seed: int | None = None) -> None:
    """Sampling settings a user can get wrong, refused with one line each."""
    check_seed(seed, "--seed")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise MoEConvertError(f"--temperature must be 0 (greedy) or a positive number, got {temperature}")
    if top_k is not None and top_k < 1:
        raise MoEConvertError(f"--top-k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise MoEConvertError(f"--top-p must be in (0, 1], got {top_p}")


@dataclass
class GenerateJob:
    """One `generate`: text from `prompt` through an export (`export_dir`, a `--format safetensors` directory)."""

    KIND = "generate"

    export_dir: str
    prompt: str
    max_new_tokens: int = option(32, "Tokens to generate (fewer if EOS or the model's context comes first).")
    temperature: float = option(0.0, "0 = greedy; > 0 samples from softmax(logits / temperature).")
    top_k: int | None = option(None, "Sample only among the K most likely tokens (with --temperature > 0). "
                                     "Default: off.")
    top_p: float | None = option(None, "Nucleus sampling: the smallest set with probability >= P (with "
                                       "--temperature > 0). Default: off.")
    seed: int | None = option(None, "Sampling seed (same seed, same text). Default: none.")

    def __post_init__(self):
        check_types(self)
        if self.max_new_tokens < 1:
            raise MoEConvertError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        check_sampling(self.temperature, self.top_k, self.top_p, self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
