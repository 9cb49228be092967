"""Which teacher layers a `--student-layers -k` student drops (`--drop-by`).

`front` drops the k layers right after layer 0: for the paper's 24-layer PR-MoE-32/64 and k=3 that is
its L21 student (two early, small MoE layers and one dense layer), and the rule for scratch students.

`measured` asks the teacher. One forward over a calibration sample of training windows (seeded,
`CALIBRATION_TOKENS`) scores, through hooks on the decoder layers that keep only the last k + 1 layer
inputs of a batch:
- every contiguous block of k layers by the angular distance arccos(cos(h_l, h_l+k)) / pi between the
  hidden state entering it and the one leaving it, averaged over tokens (Gromov et al. 2024);
- every layer by its block influence 1 - cos(h_l, h_l+1) (ShortGPT, Men et al. 2024).
A small angle means the block barely turns the residual stream, so the layers after it see what they
would have seen anyway. Neither score is the student's loss: a block can turn the stream little and
still matter, so the `VERIFIED` best blocks, the k least influential layers and the front rule's k
are then scored by the student's own loss on the same sample (the teacher run with those layers
taken out of its layer list, no copy of any weight) and the lowest wins (docs/benchmarks.md,
"Which layers a student drops", has the scores against held-out perplexity on SmolLM2-135M).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.modeling import decoder_layers
from .train import evaluate

CALIBRATION_TOKENS = 4096  # tokens of training windows the teacher is scored on
VERIFIED = 3  # best blocks by angular distance whose students' loss is measured


def front_kept(teacher_depth: int, depth: int) -> list[int]:
    """The `front` rule: keep layer 0 and the last depth - 1 layers (a 1-layer student keeps the last)."""
    return [0] + list(range(1 + teacher_depth - depth, teacher_depth)) if depth > 1 else [teacher_depth - 1]


@dataclass
class Candidate:
    """A set of layers to drop, what proposed it, and the student's perplexity on the calibration sample."""

    dropped: list[int]
    found_by: str  # "angular distance" | "block influence" | "front"
    score: float | None  # the proposing measure (lower: more redundant); None for front
    calibration_ppl: float


@dataclass
class DropChoice:
    """The measured choice (`choose_dropped`) with the scores behind it; `distill` records it."""

    dropped: list[int]
    kept: list[int]
    calibration_tokens: int
    teacher_ppl: float  # the teacher's perplexity on the calibration sample
    block_influence: list[float]  # per teacher layer
    angular_distance: list[float]  # per block start l: the block l .. l+k-1
    candidates: list[Candidate]  # scored by the student's loss; the lowest is `dropped`

    @classmethod
    def from_dict(cls, d: dict) -> "DropChoice":
        return cls(**{**d, "candidates": [Candidate(**c) for c in d["candidates"]]})


class _Redundancy:
    """Forward hooks on the decoder layers that accumulate, over tokens, each layer's block influence and
    each k-block's angular distance; a batch's hidden states live until k + 1 layers later."""

    def __init__(self, layers: torch.nn.ModuleList, k: int):
        self.k, self.depth = k, len(layers)
        self.influence = torch.zeros(self.depth, dtype=torch.float64)
        self.angular = torch.zeros(self.depth - k + 1, dtype=torch.float64)
        self.tokens = 0
        self.states: dict[int, torch.Tensor] = {}  # l -> hidden state entering layer l, (B, S, d)
        self.handles = [layer.register_forward_pre_hook(self._enter(i), with_kwargs=True)
                        for i, layer in enumerate(layers)]
        self.handles.append(layers[-1].register_forward_hook(self._leave_last))

    def _enter(self, i: int):
        def hook(module, args, kwargs):
            self._arrive(i, args[0] if args else kwargs["hidden_states"])
        return hook

    def _leave_last(self, module, args, output):
        self._arrive(self.depth, output[0] if isinstance(output, tuple) else output)

    def _arrive(self, i: int, h: torch.Tensor) -> None:
        """h (B, S, d) enters layer i (i = depth: leaves the last layer)."""
        h = h.detach().float()
        if i == 0:
            self.states.clear()
            self.tokens += h.shape[0] * h.shape[1]
        else:
            self.influence[i - 1] += (1 - F.cosine_similarity(self.states[i - 1], h, dim=-1)).sum().cpu().double()
        if i >= self.k:
            cos = F.cosine_similarity(self.states[i - self.k], h, dim=-1).clamp(-1, 1)  # (B, S)
            self.angular[i - self.k] += (torch.arccos(cos) / math.pi).sum().cpu().double()
            self.states.pop(i - self.k)
        self.states[i] = h

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.states.clear()


@contextmanager
def without_layers(model, dropped: list[int]):
    """The model computes as the teacher-initialised student that drops `dropped`: its layer list holds
    only the others (the same modules) until the block ends."""
    parent, name = decoder_layers(model)
    full, gone = getattr(parent, name), set(dropped)
    setattr(parent, name, torch.nn.ModuleList([layer for i, layer in enumerate(full) if i not in gone]))
    try:
        yield model
    finally:
        setattr(parent, name, full)


def calibration_windows(train: torch.Tensor, seed: int, tokens: int = CALIBRATION_TOKENS) -> torch.Tensor:
    """A seeded sample of training windows (N, S) holding about `tokens` tokens (all, if fewer)."""
    count = min(len(train), math.ceil(tokens / train.shape[1]))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train[order[:count].sort().values]


@torch.no_grad()
def choose_dropped(teacher, windows: torch.Tensor, k: int, batch_size: int = 8) -> DropChoice:
    """The k teacher layers whose removal costs the student least on `windows` (N, S); see the module
    docstring. Deterministic for the same windows and weights."""
    parent, name = decoder_layers(teacher)
    layers = getattr(parent, name)
    depth = len(layers)
    redundancy = _Redundancy(layers, k)
    try:
        teacher_ppl = evaluate(teacher, windows, batch_size)["ppl"]
    finally:
        redundancy.remove()
    influence = (redundancy.influence / redundancy.tokens).tolist()
    angular = (redundancy.angular / redundancy.tokens).tolist()
    proposals = {}  # dropped -> (found by, score); the first proposer of a set names it
    for start in sorted(range(len(angular)), key=angular.__getitem__)[:VERIFIED]:
        proposals.setdefault(tuple(range(start, start + k)), ("angular distance", angular[start]))
    least = tuple(sorted(sorted(range(depth), key=influence.__getitem__)[:k]))
    proposals.setdefault(least, ("block influence", sum(influence[i] for i in least)))
    front = tuple(i for i in range(depth) if i not in front_kept(depth, depth - k))
    proposals.setdefault(front, ("front", None))
    candidates = []
    for dropped, (found_by, score) in proposals.items():
        with without_layers(teacher, list(dropped)):
            ppl = evaluate(teacher, windows, batch_size)["ppl"]
        candidates.append(Candidate(list(dropped), found_by, score, ppl))
    best = min(candidates, key=lambda c: c.calibration_ppl)
    return DropChoice(best.dropped, [i for i in range(depth) if i not in best.dropped], windows.numel(), teacher_ppl,
                      influence, angular, candidates)
