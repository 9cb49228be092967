"""The PR-MoE load-balancing (aux) loss at a scope (`--aux-scope`), and expert-load entropies for the log.

Per layer the aux loss is `E * sum_e mean(p_e) * frac_e` over some set of tokens: p_e the gate's
probability of expert e, frac_e the share of the counted choices (first choices; k > 2: all) that
went to e. `micro` computes it over each process's micro-batch, as DeepSpeed does per rank and as the
model's own `outputs.aux_loss` does. `global` computes it over every token of the optimizer step (all
processes, all micro-batches), which lets experts specialise on what the whole batch holds rather
than evening out every micro-batch (Qiu et al., "Demons in the Detail", arXiv 2501.11873).

How `global` gets the exact gradient. Over the step's tokens, with sums P_e = sum_t p_e(t),
counts C_e and T tokens, the loss is `E / (T * sum(C)) * sum_e C_e * P_e`. The counts are
non-differentiable, so the loss is linear in the probability sums, and P_e is the sum of every
(process r, micro-batch m) piece P_e^{r,m}. Each piece's backward therefore needs the global counts
and nothing else global:

    a_{r,m} = W * G * E / (T * sum(C)) * sum_e C_e * P_e^{r,m}      (W processes, G micro-batches)

DDP averages gradients over W and the trainer divides each micro-batch's loss by G, so the
gradients of the a_{r,m} add up to exactly the gradient of the global loss; their mean, which the
trainer logs, is its value. The counts come from one all-reduce of all layers' counts concatenated.
With G > 1 a micro-batch's backward runs before later micro-batches are seen, so the step starts
with a routing pre-pass: every micro-batch of the step is run forward once more, with the random
state replayed so that dropout draws the same masks (same code path, same routing), and the counts
it gives are all-reduced. That costs one extra forward per micro-batch (the head on one position only).
"""

from __future__ import annotations

import torch

from ..errors import MoEConvertError


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum `tensor` in place over the data-parallel processes: `group`, or torch.distributed's default
    group when one is initialised; one process leaves it as is."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def group_size(group=None) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def load_entropy(counts: torch.Tensor) -> torch.Tensor:
    """() nats: entropy of the expert-load distribution `counts` (E,); log E when perfectly even."""
    p = counts.double() / counts.sum().clamp_min(1)
    return -(p * p.clamp_min(1e-300).log()).sum().float()


class LoadBalance:
    """One training run's aux scope for a PR-MoE model, as steps of the trainer's loop.

    Per optimizer step: `begin(batches)` with this process's micro-batches (`global` with several
    micro-batches: the routing pre-pass); after each micro-batch's forward `micro_loss(out)`, which
    swaps the micro-batch aux term in `out["loss"]` for its share of the global loss (`global`) and
    adds the micro-batch load entropies; `end()` the entropies of the step's global load.
    """

    def __init__(self, model, scope: str, grad_accum: int, group=None):
        self.model, self.scope, self.grad_accum, self.group = model, scope, grad_accum, group
        self.layers = model.moe_layers()
        self.names = [str(i) for i in model.config.moe_layers]  # decoder-layer index of each MoE layer
        self.sizes = list(model.config.num_experts)
        self.coef = model.config.aux_loss_coef
        self.world = group_size(group)
        self.step_counts = self.global_counts = None

    def begin(self, batches: list[torch.Tensor]) -> None:
        """Start a step; `batches` are this process's micro-batches of it, in order."""
        self.step_counts = None  # (sum E + 1,) this process's counts and tokens over the step so far
        self.global_counts = self._pre_pass(batches) if self.scope == "global" and len(batches) > 1 else None

    def _loads(self) -> torch.Tensor:
        """(sum E + 1,) int64: every layer's counts from the last forward, then its token count."""
        loads = [m.load for m in self.layers]
        tokens = torch.tensor([loads[0].tokens], device=loads[0].counts.device)
        return torch.cat([load.counts for load in loads] + [tokens])

    def _pre_pass(self, batches: list[torch.Tensor]) -> torch.Tensor:
        """The step's global counts before its first backward: every micro-batch routed once, as the
        training forward will route it (grad mode on, so the same kernels; random state replayed)."""
        device = batches[0].device
        counts = 0
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
            for batch in batches:
                self.model(input_ids=batch, logits_to_keep=1)  # the routing; the head on one position only
                counts = counts + self._loads()
        for m in self.layers:  # free the pre-pass graphs before the training forward builds its own
            m.aux_loss = m.load = None
        return all_reduce_sum(counts, self.group)

    def micro_loss(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`out` of the loss function after a micro-batch's forward, with the loss at this scope."""
        loads = [m.load for m in self.layers]
        counts = self._loads()
        self.step_counts = counts if self.step_counts is None else self.step_counts + counts
        logs = {f"load_entropy_micro_{name}": load_entropy(load.counts) for name, load in zip(self.names, loads)}
        if self.scope == "micro":
            return {**out, **logs}
        if "aux" not in out:
            raise MoEConvertError("aux_scope: global needs the loss function to return the PR-MoE aux loss it adds "
                                  "to 'loss' as 'aux'")
        if self.global_counts is None:  # one micro-batch per step: this one is this process's whole share
            self.global_counts = all_reduce_sum(counts.clone(), self.group)
        *per_layer, tokens = self.global_counts.split(self.sizes + [1])
        tokens = tokens[0]
        share = self.world * self.grad_accum
        aux = sum(E * share * (c.to(load.prob_sum.dtype) * load.prob_sum).sum() / (tokens * c.sum())
                  for E, c, load in zip(self.sizes, per_layer, loads))
        # The micro-batch term's gradient cancels exactly: both paths hand it the same +-coef / G.
        loss = out["loss"] + self.coef * (aux - out["aux"])
        return {**out, **logs, "loss": loss, "aux": aux, "aux_micro": out["aux"]}

    def end(self) -> dict[str, torch.Tensor]:
        """The load entropies of the step's global batch, per layer."""
        counts = self.global_counts if self.global_counts is not None else all_reduce_sum(self.step_counts, self.group)
        per_layer = counts.split(self.sizes + [1])[:-1]
        return {f"load_entropy_global_{name}": load_entropy(c) for name, c in zip(self.names, per_layer)}
