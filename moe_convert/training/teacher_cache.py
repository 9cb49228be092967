"""`distill --teacher-cache DIR`: the teacher's top-K logits per training window, kept on disk.

What top-K KD needs of the teacher at a position (`distill.kd_loss_top_k`) is its K largest logits,
their token ids and the logsumexp of its other logits at the KD temperature, so that is what is kept:
per window (S, K) logits in the teacher's output dtype, (S, K) int32 ids and (S,) fp32 `rest_lse`, one
safetensors file per window under `DIR/<teacher fingerprint>-<teacher dtype>-top<K>-T<temperature>-v2/`,
named by a hash of the window's tokens. A teacher with a capacity factor is refused: its logits for a
window depend on the other windows of its batch. A window the student meets again (a later epoch,
another run on the same teacher and data, another process) is read back instead of running the
teacher; a batch whose windows are all cached skips the teacher forward, and in a batch where some are
missing the kept ones still give their kept values. Files are written under a temporary name and
renamed, so concurrent processes and interrupted runs never leave a partial entry; an entry that cannot
be read is removed and computed again. A cached window gives exactly what the teacher gave.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


FORMAT = 2  # 2: `rest_lse` is the logsumexp of the logits outside the top K (1 kept the whole logsumexp)


class TeacherCache:
    def __init__(self, root: str | Path, teacher_fingerprint: str, top_k: int, temperature: float, teacher_dtype: str):
        # everything the kept values depend on: the teacher (content), its precision, K, the temperature,
        # and what the entries hold
        self.dir = Path(root) / (f"{teacher_fingerprint.split()[-1]}-{teacher_dtype}-top{top_k}-T{temperature!r}"
                                 f"-v{FORMAT}")
        self.dir.mkdir(parents=True, exist_ok=True)

    def _file(self, window: torch.Tensor) -> Path:
        return self.dir / f"{hashlib.sha256(window.numpy().tobytes()).hexdigest()[:32]}.safetensors"

    def get(self, batch: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
        """Per window of `batch` (B, S): its (values (S, K), ids (S, K) int64, rest_lse (S,)), or None when it
        is not kept. An entry that cannot be read (a damaged file) is removed and counts as not kept."""
        return [self._read(self._file(w)) for w in batch.cpu()]  # one copy to the host, not one per window

    def _read(self, file: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if not file.is_file():
            return None
        try:
            entry = load_file(file)
            return entry["values"], entry["ids"].long(), entry["rest_lse"]
        except Exception:  # truncated or foreign: computed again and rewritten by `put`
            file.unlink(missing_ok=True)
            return None

    def put(self, batch: torch.Tensor, values: torch.Tensor, ids: torch.Tensor, rest_lse: torch.Tensor) -> None:
        """Keep `distill.top_k_of`'s output for every window of `batch` (B, S)."""
        for window, v, i, r in zip(batch.cpu(), values, ids, rest_lse):
            file = self._file(window)
            if not file.is_file():
                tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
                save_file({"values": v.contiguous().cpu(), "ids": i.to(torch.int32).contiguous().cpu(),
                           "rest_lse": r.contiguous().cpu()}, tmp)
                os.replace(tmp, file)
