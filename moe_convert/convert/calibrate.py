"""A causal LM's hidden states on a sample, one decoder block at a time, and routers fitted to them.

The model is built with its parameters on the meta device and only the parts outside the decoder
layers (embeddings, final norm, LM head) are read from the checkpoint. The host's own forward, stopped
at its first decoder layer, gives what every block takes (embeddings, attention mask, rotary or
position embeddings) exactly as the host builds them; then each block is read, run over the whole
sample and dropped. Memory holds one block and the sample's activations, never the model.

The sample is cut into fixed chunks of rows, each computed on one intra-op thread while the chunks
spread over the thread pool: float sums split over threads round differently, so this is what makes
the hidden states (and the routers fitted to them) the same bytes whatever the machine's core count.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
from torch import nn

from ..io import return_freed_memory
from ..model.modeling import HostSpec

CHUNK_ROWS = 4  # sample rows per chunk of work (one thread each)
ROUTER_LOGIT_STD = 1e-6  # std of router logits over tokens: p_e = 1/E * (1 + O(this)), function-preserving
WHITEN_RIDGE = 1e-2  # whitening damps directions with less than this share of the mean variance
BALANCE_ROUNDS, BALANCE_STEP = 100, 0.1  # per-expert rescalings evening out the argmax shares on the sample


def host_names(keys: Iterable[str], base_prefix: str, needed: set[str]) -> dict[str, str]:
    """Host tensor name -> its name among a checkpoint's `keys`, for the `needed` ones, found under either
    spelling (GPT-2 hub files have no `transformer.` prefix; transformers v5 writes it)."""
    found = {}
    for name in keys:
        for canonical in (name, f"{base_prefix}.{name}"):
            if canonical in needed:
                found[canonical] = name
    return found


def _load_params(module: nn.Module, load: Callable[[str], torch.Tensor | None], skip: str | None = None) -> None:
    """Give `module`'s meta parameters (those not under `skip`) the checkpoint's tensors, in fp32.

    `load(name)` returns the tensor stored under a parameter's name, or None; tied parameters (one
    object under several names, e.g. a tied LM head) are read once under whichever name is stored."""
    names: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if p.is_meta and not (skip and name.startswith(skip)):
            names.setdefault(id(p), []).append(name)
    for group in names.values():
        t = next((t for t in map(load, group) if t is not None), None)
        if t is None:
            raise KeyError(group[0])
        param = nn.Parameter(t.float(), requires_grad=False)
        for name in group:
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner), attr, param)


def on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """The model `build()` makes, its parameters on the meta device (buffers such as rotary frequencies
    computed for real), its tied parameters one object again."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = build()
    model.tie_weights()
    return model


class _BlockInputs(Exception):
    """Raised by the first decoder block's pre-hook: the host's forward has built that block's inputs."""

    def __init__(self, args: tuple, kwargs: dict):
        super().__init__()
        self.args, self.kwargs = args, kwargs


@contextmanager
def one_thread() -> Iterator[int]:
    """Torch on one intra-op thread inside; yields the thread count outside."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def on_one_thread_each(fn: Callable, items: Iterable) -> list:
    """`[fn(item) for item in items]`, each call on one intra-op thread, the calls spread over the pool."""
    with one_thread() as threads, ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))


class StreamedLM:
    """A causal LM on the meta device whose decoder blocks are read from a checkpoint one at a time.

    `lm` is the host causal LM (a dense model, or the host inside a PR-MoE model) built on the meta
    device; `load(name)` returns the stored tensor of one of its parameter names, or None.
    """

    def __init__(self, lm: nn.Module, spec: HostSpec, load: Callable[[str], torch.Tensor | None]):
        self.lm, self.spec, self.load = lm.eval(), spec, load
        self.blocks = lm.get_submodule(spec.layers)
        _load_params(lm, load, skip=spec.layers + ".")  # embeddings, final norm, LM head
        self._chunk = threading.local()  # which chunk this thread runs, for the FFN taps

    def _inputs(self, ids: torch.Tensor) -> tuple[torch.Tensor, tuple, dict]:
        """ids (b, L) -> the first block's inputs: hidden states (b, L, d), other args, kwargs."""
        def catch(module, args, kwargs):
            raise _BlockInputs(args, kwargs)

        hook = self.blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            self.lm.base_model(input_ids=ids, use_cache=False)
        except _BlockInputs as caught:
            return caught.args[0], caught.args[1:], caught.kwargs
        finally:
            hook.remove()
        raise RuntimeError("the host's forward never reached its first decoder block")

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, taps: dict[int, Callable[[torch.Tensor, nn.Module], None]] | None = None,
            blocks: int | None = None) -> torch.Tensor:
        """ids (B, L) through the first `blocks` decoder blocks (all by default) -> hidden states (B, L, d).

        `taps[i](x, block)` gets the input of block i's FFN over the whole sample, x (B*L, d) in row order,
        while the block is loaded."""
        taps = taps or {}
        chunks = list(ids.split(CHUNK_ROWS))
        inputs = on_one_thread_each(self._inputs, chunks)
        hidden = [h for h, _, _ in inputs]
        for i in range(len(self.blocks) if blocks is None else blocks):
            block = self.blocks[i]
            prefix = f"{self.spec.layers}.{i}."
            _load_params(block, lambda name: self.load(prefix + name))
            seen: dict[int, torch.Tensor] = {}
            hook = (getattr(block, self.spec.ffn_attr).register_forward_pre_hook(
                lambda m, args: seen.__setitem__(self._chunk.index, args[0].reshape(-1, args[0].shape[-1])))
                if i in taps else None)

            def step(c: int) -> torch.Tensor:
                self._chunk.index = c
                _, args, kwargs = inputs[c]
                return block(hidden[c], *args, **kwargs)

            try:
                hidden = on_one_thread_each(step, range(len(chunks)))
            finally:
                if hook is not None:
                    hook.remove()
            if i in taps:
                taps[i](torch.cat([seen[c] for c in range(len(chunks))]), block)
            block.to_empty(device="meta")  # frees the block
            return_freed_memory()  # and hands it back: the pool threads' malloc arenas would keep it
        return torch.cat(hidden)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last block's hidden states (B, L, d) -> logits (B, L, V) in fp32, through the final norm and LM head."""
        final_norm = self.lm.get_submodule(self.spec.final_norm)
        return self.lm.get_output_embeddings()(final_norm(hidden)).float()


def balanced_router(x: torch.Tensor, num_experts: int, generator: torch.Generator) -> torch.Tensor:
    """Router weight (E, d) with logits of std ROUTER_LOGIT_STD whose argmax splits the tokens of x (T, d) evenly.

    The router has no bias, so its logits are made blind to the mean hidden state (x centred and
    projected orthogonal to the mean). Its directions are random in the whitened space of what is
    left (every principal direction equally loud, those under WHITEN_RIDGE of the mean variance
    damped), which spreads tokens without favouring the loud directions a few outlier features
    own; then one scale per expert is fitted so that argmax gives every expert the same share of x.
    Clustering the tokens (balanced k-means) splits x exactly too, but follows its topics and
    spreads held-out text worse (docs/benchmarks.md).
    """
    x = x.float()
    mean = x.mean(0)  # (d,)
    unit_mean = mean / mean.norm().clamp_min(1e-12)
    y = x - mean
    y = y - torch.outer(y @ unit_mean, unit_mean)  # (T, d): centred, orthogonal to the mean
    cov = (y.t() @ y).double() / y.shape[0]  # (d, d)
    y, unit_mean = y.double(), unit_mean.double()
    cov.diagonal().add_(WHITEN_RIDGE * cov.diagonal().mean())
    chol = torch.linalg.cholesky(cov)  # cov = L L^T; z = L^-1 y has unit covariance
    g = torch.randn(num_experts, x.shape[1], generator=generator, dtype=torch.float64)
    w = torch.linalg.solve_triangular(chol.t(), g.t(), upper=True).t()  # (E, d): y w^T = z g^T
    w = w - torch.outer(w @ unit_mean, unit_mean)  # exactly blind to the mean state
    scores = y @ w.t()  # (T, E)
    scale = torch.ones(num_experts, dtype=torch.float64)
    for _ in range(BALANCE_ROUNDS):  # multiplicative updates toward equal argmax shares
        share = torch.bincount((scores * scale).argmax(-1), minlength=num_experts) / scores.shape[0]
        scale = scale * (1.0 / num_experts / share.clamp_min(0.25 / scores.shape[0])) ** BALANCE_STEP
    w = w * scale[:, None]
    return (w * (ROUTER_LOGIT_STD / (scores * scale).std(0).mean())).float()
