"""`distill --teacher-cache DIR`: the teacher's top-K logits per training window, kept on disk.

What top-K KD needs of the teacher at a position is its K largest logits and their token ids
(`distill.kd_loss_top_k`), so that is what is kept: per window (S, K) logits in the teacher's
output dtype and (S, K) int32 ids, one safetensors file per window under
`DIR/<teacher fingerprint>-top<K>/`, named by a hash of the window's tokens. A window the student
meets again (a later epoch, another run on the same teacher and data, another process) is read back
instead of running the teacher; a batch whose windows are all cached skips the teacher forward.
Files are written under a temporary name and renamed, so concurrent processes and interrupted runs
never leave a partial entry, and a cached window gives exactly what the teacher gave.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class TeacherCache:
    def __init__(self, root: str | Path, teacher_fingerprint: str, top_k: int):
        self.dir = Path(root) / f"{teacher_fingerprint.split()[-1]}-top{top_k}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.top_k = top_k
        self.hits = self.misses = 0  # windows, over this object's life

    def _file(self, window: torch.Tensor) -> Path:
        return self.dir / f"{hashlib.sha256(window.cpu().numpy().tobytes()).hexdigest()[:32]}.safetensors"

    def get(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(values (B, S, K), ids (B, S, K)) of every window of `batch` (B, S), or None if any is missing."""
        files = [self._file(w) for w in batch]
        if not all(f.is_file() for f in files):
            return None
        entries = [load_file(f) for f in files]
        self.hits += len(files)
        return (torch.stack([e["values"] for e in entries]).to(batch.device),
                torch.stack([e["ids"] for e in entries]).to(batch.device).long())

    def put(self, batch: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the top-K of `teacher_logits` (B, S, V) for every window of `batch`; returns them as `get` does."""
        values, ids = teacher_logits.topk(self.top_k, dim=-1)  # (B, S, K)
        for window, v, i in zip(batch, values, ids):
            file = self._file(window)
            if not file.is_file():
                tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
                save_file({"values": v.contiguous().cpu(), "ids": i.to(torch.int32).contiguous().cpu()}, tmp)
                os.replace(tmp, file)
        self.misses += len(batch)
        return values, ids
