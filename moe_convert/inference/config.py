"""Typed, validated options of `generate` (`GenerateJob`) and the sampling checks the runtime shares.

Pure Python (no torch) so the CLI can build its options from these fields before anything heavy loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

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
    """One `generate`: text from each prompt (`prompts`, then the lines of `prompts_file`) through an export
    (`export_dir`, a `--format safetensors` directory); several prompts decode together as one batch."""

    KIND = "generate"

    export_dir: str
    prompts: list[str]
    prompts_file: str | None = option(None, "A text file of prompts, one per line (blank lines skipped), decoded "
                                            "together with any --prompt as one batch. Default: none.")
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
        if not self.prompts and self.prompts_file is None:
            raise MoEConvertError("generate needs a --prompt or a --prompts-file")

    def all_prompts(self) -> list[str]:
        """`prompts`, then `prompts_file`'s non-blank lines."""
        if self.prompts_file is None:
            return list(self.prompts)
        try:
            lines = Path(self.prompts_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise MoEConvertError(f"--prompts-file {self.prompts_file}: cannot be read ({e})") from None
        prompts = list(self.prompts) + [line for line in lines if line.strip()]
        if not prompts:
            raise MoEConvertError(f"--prompts-file {self.prompts_file}: no prompt in it")
        return prompts

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
