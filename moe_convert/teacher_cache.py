"""`distill --teacher-cache DIR`: the teacher's top-K logits per training window, kept on disk.

What top-K KD needs of the teacher at a position (`distill.kd_loss_top_k`) is its K largest logits,
their token ids and the logsumexp of all its logits at the KD temperature, so that is what is kept:
per window (S, K) logits in the teacher's output dtype, (S, K) int32 ids and (S,) fp32 logsumexp, one
safetensors file per window under `DIR/<teacher fingerprint>-<teacher dtype>-top<K>-T<temperature>/`,
named by a hash of the window's tokens. A teacher with a capacity factor is refused: its logits for a
window depend on the other windows of its batch. A window the student
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
    def __init__(self, root: str | Path, teacher_fingerprint: str, top_k: int, temperature: float, teacher_dtype: str):
        # everything the kept values depend on: the teacher (content), its precision, K and the temperature
        self.dir = Path(root) / f"{teacher_fingerprint.split()[-1]}-{teacher_dtype}-top{top_k}-T{temperature!r}"
        self.dir.mkdir(parents=True, exist_ok=True)

    def _file(self, window: torch.Tensor) -> Path:
        return self.dir / f"{hashlib.sha256(window.cpu().numpy().tobytes()).hexdigest()[:32]}.safetensors"

    def get(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(values (B, S, K), ids (B, S, K), logsumexp (B, S)) of every window of `batch` (B, S), or None
        if any window is missing."""
        files = [self._file(w) for w in batch]
        if not all(f.is_file() for f in files):
            return None
        entries = [load_file(f) for f in files]
        values, ids, lse = (torch.stack([e[k] for e in entries]).to(batch.device) for k in ("values", "ids", "lse"))
        return values, ids.long(), lse

    def put(self, batch: torch.Tensor, values: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor) -> None:
        """Keep `distill.top_k_of`'s output for every window of `batch` (B, S)."""
        for window, v, i, l in zip(batch, values, ids, lse):
            file = self._file(window)
            if not file.is_file():
                tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
                save_file({"values": v.contiguous().cpu(), "ids": i.to(torch.int32).contiguous().cpu(),
                           "lse": l.contiguous().cpu()}, tmp)
                os.replace(tmp, file)
