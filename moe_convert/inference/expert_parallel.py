"""Expert-parallel inference: each process holds one rank's experts and sends tokens to them by all-to-all.

An `export --ep-size N` directory has one file per expert-parallel rank holding that rank's
contiguous range of every MoE layer's experts, and the shared weights once. Started as N processes
(`torchrun --nproc_per_node N`), rank r loads the shared weights and its own experts only, so the
experts' memory is split N ways (DeepSpeed-MoE paper, section 5: expert parallelism). In every MoE
layer each process routes its own tokens, then (`ExpertParallel.exchange`):

1. all-to-all of the per-expert token counts, so every rank knows how many rows it will receive;
2. all-to-all of the expert-sorted rows (already grouped by destination rank, since each rank owns
   a contiguous expert range);
3. the rank's experts on what it received, regrouped expert-major, through the same kernels
   (`kernels.expert_ffn`) as one process;
4. all-to-all of the results back, in the order they were sent; the combine and the residual
   branch then run locally (`kernels.moe_forward`).

Collectives go through `torch.distributed` with gloo: the runtime runs on CPU. The paper's hierarchical
all-to-all (within a node first, then across nodes) only pays across machines; it is not built.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import MoEConvertError


@dataclass(frozen=True)
class ExpertParallel:
    """This process's place in the expert-parallel group (the default process group)."""

    rank: int
    size: int

    def exchange(self, x_sorted: torch.Tensor, counts: torch.Tensor,
                 run_local: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Expert outputs (N, d) for this rank's rows x_sorted (N, d), grouped by expert with `counts` (E,)
        over all experts; `run_local(rows, local_counts)` runs this rank's experts on expert-grouped rows."""
        import torch.distributed as dist

        send = counts.view(self.size, -1)  # (ranks, local experts): rows this rank sends each expert
        recv = torch.empty_like(send)  # (ranks, local experts): rows each rank sends this rank's experts
        dist.all_to_all_single(recv, send)
        sent_per_rank, got_per_rank = send.sum(1).tolist(), recv.sum(1).tolist()
        received = x_sorted.new_empty(sum(got_per_rank), x_sorted.shape[-1])  # (M, d): by source, then expert
        dist.all_to_all_single(received, x_sorted.contiguous(), got_per_rank, sent_per_rank)
        local = torch.arange(recv.shape[1]).repeat(self.size).repeat_interleave(recv.flatten())  # (M,) expert
        order = local.argsort(stable=True)  # expert-major, sources in rank order within an expert
        y = torch.empty_like(received)
        y[order] = run_local(received[order], recv.sum(0))
        back = torch.empty_like(x_sorted)  # (N, d) in x_sorted's order
        dist.all_to_all_single(back, y, sent_per_rank, got_per_rank)
        return back

    def agree(self, tokens: list[int]) -> list[int]:
        """Rank 0's next tokens (one per sequence of the batch), on every rank, in one broadcast: the ranks
        decode the batch together, so they run the same number of forwards (each one's all-to-alls wait for
        every rank) and stop together."""
        import torch.distributed as dist

        t = torch.tensor(tokens)
        dist.broadcast(t, 0)
        return t.tolist()

    def check_all_loaded(self, error: BaseException | None) -> None:
        """Every rank reports whether it loaded its part (`error`: why not) before any all-to-all, so a rank
        that failed does not leave the others waiting in a collective; they stop with one line each."""
        import torch.distributed as dist

        failed = torch.tensor([self.size if error is None else self.rank])
        dist.all_reduce(failed, dist.ReduceOp.MIN)
        if error is not None:
            raise error
        if int(failed) < self.size:
            raise MoEConvertError(f"expert-parallel rank {int(failed)} could not load its part of the export "
                                  f"(its error is above)")

    def close(self) -> None:
        """Leave the process group once every rank is done (exiting without it can abort a process)."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def from_environment(ep_size: int) -> ExpertParallel | None:
    """The expert-parallel group of a process started by torchrun (WORLD_SIZE > 1), its process group set
    up (gloo on CPU); None for a single process. The world size must equal the export's `ep_size`: every
    rank exits with status 2, rank 0 says why."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return None
    if world != ep_size:
        if int(os.environ.get("RANK", "0")) != 0:
            raise SystemExit(2)
        raise MoEConvertError(f"{world} processes, but the export has --ep-size {ep_size}: start one process per "
                              f"expert-parallel rank (torchrun --nproc_per_node {ep_size})")
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return ExpertParallel(dist.get_rank(), world)
