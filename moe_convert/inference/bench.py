"""`moe-convert bench layer`: one PR-MoE layer (top-1 + residual, GPT-2 kind FFN, f = 4d) timed across
implementations on the same inputs and weights, against the hardware floor measured in the same run.

Implementations (each computes `c0 * moe(x) + c1 * mlp(x)` with an fp32 top-1 gate):
- `moe_convert`: our kernels as the runtime runs them (`runtime.MoELayer`), the weights packed for
  oneDNN once at setup as `generate` does at load; `moe_convert[loop]` / `moe_convert[grouped_mm]`: the
  stacked [E, in, out] weights as `PRMoELayer` holds them, one expert-matmul backend forced (the
  dispatch table's evidence);
- `deepspeed`: `deepspeed.moe.layer.MoE(d, GPT2MLP, E, k=1, use_residual=True, drop_tokens=False)`;
- `einsum`: the paper's baseline, a faithful small copy of DeepSpeed's old dense one-hot dispatch
  (`einsum("sec,sm->ecm")`, per-expert FFNs on the [E, C, d] buffer, `einsum("sec,ecm->sm")`), dropless;
- `hf_eager`, `hf_grouped_mm`, `hf_batched_mm`: transformers' experts backends on its own non-gated
  experts class (`NemotronHExperts`, no biases: the bench's biases are zero so every row computes the same function);
- `dense_ffn`: a dense FFN of the same useful FLOPs (expert branch + residual branch = 2 FFNs over T tokens);
- `floor`: max(useful FLOPs / measured GEMM rate, bytes of the weights that must be read / measured bandwidth),
  the GEMM rate being the best of torch's matmul (MKL) and oneDNN's linear.

`--backward` times training instead: each call runs the forward, a scalar loss `y.float().square().mean()` and
the backward, every parameter's and the input's gradient set to None before it, so every implementation does the
same work. `moe_convert` is then a `PRMoELayer` built from the same weights, as training runs it (automatic
expert backend; `[loop]` / `[grouped_mm]` force `layer.experts.backend`); `deepspeed` its `MoE` in train mode;
`hf_*`, `einsum` and `dense_ffn` the same functions on trainable copies of the weights. `max_err` is the larger
of the output's and the input gradient's error against `moe_convert`. The floor counts
  FLOPs = 3 x the forward's (each matmul's forward, plus its two backward matmuls: dX = dY W^T, dW = X^T dY),
  bytes = 2 x the forward's weight bytes (the weights read, their gradients written).
The bench runs on the CPU, or on a CUDA device (`device=`, timing after a device synchronize).
"""

from __future__ import annotations

import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..errors import MoEConvertError
from ..formats import DEEPSPEED_ROUTER, deepspeed_expert_key
from ..io import DTYPES
from ..options import check_seed
from . import kernels
from .kernels import ACTIVATIONS, back_with_huge_pages, ffn, pack_experts, pack_ffn, packed_matrices
from ..model.modeling import host_spec
from ..model.moe import Experts, PRMoELayer
from .runtime import MoELayer

ACT = "gelu_pytorch_tanh"  # GPT-2's tanh GELU, fused in every implementation
BATCHED_MM_LIMIT = 2 * 2**30  # hf_batched_mm copies the chosen expert's weights per token: skip past 2 GiB


def free_port() -> int:
    """A free local TCP port (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process_dist() -> None:
    """torch.distributed with gloo, world size 1, on a free local port (DeepSpeed's MoE wants a process group)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    port = free_port()
    # init_method, not MASTER_* environment variables: those would leak into child processes
    # (torchrun / Accelerate would then try to join this group's port)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def deepspeed_moe_class():
    """`deepspeed.moe.layer.MoE`, ready to build (process group up), its log kept off stdout
    (`deepspeed_engine.import_deepspeed`). MoEConvertError when DeepSpeed is not installed."""
    from ..training.deepspeed_engine import import_deepspeed

    import_deepspeed()
    from deepspeed.moe.layer import MoE

    init_single_process_dist()
    return MoE


@dataclass
class LayerWeights:
    """One PR-MoE layer's tensors, GPT-2 kind, [in, out] layout."""

    router: torch.Tensor  # (E, d)
    stacked: dict[str, torch.Tensor]  # w_in [E, d, f], b_in [E, f], w_out [E, f, d], b_out [E, d]
    dense: dict[str, torch.Tensor]  # the residual FFN, same keys without E
    coef_w: torch.Tensor  # (2, d)
    coef_b: torch.Tensor  # (2,)

    @property
    def num_experts(self) -> int:
        return self.router.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [self.router, *self.stacked.values(), *self.dense.values(), self.coef_w, self.coef_b]

    def to(self, **kwargs) -> "LayerWeights":
        """A copy with every tensor moved (`torch.Tensor.to`'s keywords)."""
        def move(t):
            return t.to(**kwargs)
        return LayerWeights(move(self.router), {k: move(v) for k, v in self.stacked.items()},
                            {k: move(v) for k, v in self.dense.items()}, move(self.coef_w), move(self.coef_b))

    def trainable(self) -> "LayerWeights":
        """A copy whose tensors are leaves that take gradients (one per implementation: no shared .grad)."""
        def leaf(t):
            return t.detach().clone().requires_grad_()
        return LayerWeights(leaf(self.router), {k: leaf(v) for k, v in self.stacked.items()},
                            {k: leaf(v) for k, v in self.dense.items()}, leaf(self.coef_w), leaf(self.coef_b))


def make_weights(E: int, d: int, dtype: torch.dtype, seed: int = 0) -> LayerWeights:
    g = torch.Generator().manual_seed(seed)
    f = 4 * d

    def rnd(*shape, std):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    def zeros(*shape):
        return torch.zeros(*shape, dtype=dtype)

    stacked = {"w_in": rnd(E, d, f, std=d**-0.5), "b_in": zeros(E, f), "w_out": rnd(E, f, d, std=f**-0.5),
               "b_out": zeros(E, d)}
    dense = {"w_in": rnd(d, f, std=d**-0.5), "b_in": zeros(f), "w_out": rnd(f, d, std=f**-0.5), "b_out": zeros(d)}
    return LayerWeights(rnd(E, d, std=d**-0.5), stacked, dense, rnd(2, d, std=d**-0.5), zeros(2))


# --- implementations: each builds a callable x (T, d) -> y (T, d) from the same weights -------------
def _residual(w: LayerWeights, x: torch.Tensor):
    """(coef (T, 2), dense FFN output (T, d))."""
    return F.linear(x, w.coef_w, w.coef_b).softmax(-1), ffn(x, w.dense, ACTIVATIONS[ACT])


def impl_moe_convert(w: LayerWeights, backend: str | None = None) -> Callable:
    """Our kernels. No backend: as the runtime runs them, weights packed once at setup (`generate` packs
    at load). A backend: the stacked [E, in, out] weights as `PRMoELayer` holds them, that backend forced."""
    stacked, dense = (w.stacked, w.dense) if backend else (pack_experts(w.stacked), pack_ffn(w.dense))
    back_with_huge_pages(packed_matrices(stacked) + packed_matrices(dense))  # as the runtime does after packing
    return MoELayer(w.router, stacked, dense, (w.coef_w, w.coef_b), ACTIVATIONS[ACT], backend=backend)


def _top1(w: LayerWeights, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 gate: (T,) expert ids and (T,) raw top-1 probabilities."""
    probs = F.linear(x.float(), w.router.float()).softmax(-1)
    p, e = probs.max(-1)
    return e, p


def _mix(w, x, moe_out):
    coef, dense = _residual(w, x)
    return moe_out * coef[:, 0:1] + dense * coef[:, 1:]


def impl_einsum(w: LayerWeights) -> Callable:
    """DeepSpeed <= 0.19.3's dense dispatch (GShard einsums), dropless capacity = max count."""
    act = ACTIVATIONS[ACT]

    def run(x):
        E = w.num_experts
        e, p = _top1(w, x)
        mask = F.one_hot(e, E)  # (T, E)
        loc = (mask.cumsum(0) - 1) * mask  # (T, E) slot of each token inside its expert
        C = int(mask.sum(0).max())
        combine = (p[:, None] * mask)[:, :, None] * F.one_hot(loc.sum(1), C)[:, None, :]  # (T, E, C) fp32
        dispatched = torch.einsum("sec,sm->ecm", (combine > 0).to(x.dtype), x)  # (E, C, d)
        out = torch.stack([ffn(dispatched[j], {k: v[j] for k, v in w.stacked.items()}, act) for j in range(E)])
        return _mix(w, x, torch.einsum("sec,ecm->sm", combine.to(x.dtype), out))  # (T, d)
    return run


def _hf(w: LayerWeights, backend: str) -> tuple[Callable, torch.nn.Module]:
    """transformers' experts backends (`eager`, `grouped_mm`, `batched_mm`) on its non-gated experts class:
    (the layer's callable, the experts module)."""
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    E, d = w.router.shape
    f = 4 * d
    cfg = SimpleNamespace(n_routed_experts=E, hidden_size=d, moe_intermediate_size=f, moe_latent_size=None,
                          mlp_hidden_act=ACT, _experts_implementation=backend)
    experts = NemotronHExperts(cfg).to(w.router.dtype).to(w.router.device)
    with torch.no_grad():
        experts.up_proj.copy_(w.stacked["w_in"].transpose(1, 2))  # [E, f, d]
        experts.down_proj.copy_(w.stacked["w_out"].transpose(1, 2))  # [E, d, f]

    def run(x):
        e, p = _top1(w, x)
        return _mix(w, x, experts(x, e[:, None], p[:, None].to(x.dtype)).to(x.dtype))
    return run, experts


def impl_hf(w: LayerWeights, backend: str) -> Callable:
    return _hf(w, backend)[0]


def _deepspeed_layer(w: LayerWeights) -> torch.nn.Module:
    MoE = deepspeed_moe_class()
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    E, d = w.router.shape
    cfg = GPT2Config(n_embd=d, activation_function=ACT, resid_pdrop=0.0)
    # min_capacity 1: dropless, capacity is the largest count anyway; DeepSpeed refuses fewer tokens than it
    layer = MoE(d, GPT2MLP(4 * d, cfg), num_experts=E, k=1, use_residual=True, drop_tokens=False, min_capacity=1)
    sd = {DEEPSPEED_ROUTER: w.router, "coefficient.weight": w.coef_w, "coefficient.bias": w.coef_b}
    for ours, (key, _) in host_spec("gpt2").expert_keys.items():  # Conv1D: [in, out] as ours
        sd[f"mlp.{key}"] = w.dense[ours]
        for j in range(E):
            sd[deepspeed_expert_key(j, key)] = w.stacked[ours][j]
    layer.load_state_dict({k: v.detach().float() for k, v in sd.items()})
    return layer.to(w.router.dtype).to(w.router.device)


def impl_deepspeed(w: LayerWeights) -> Callable:
    layer = _deepspeed_layer(w).eval()
    return lambda x: layer(x[None])[0][0]


def impl_dense(w: LayerWeights) -> Callable:
    """Same useful FLOPs as the layer's two branches: one dense FFN over 2T tokens, weights packed as ours."""
    act, dense = ACTIVATIONS[ACT], pack_ffn(w.dense)
    back_with_huge_pages(packed_matrices(dense))
    return lambda x: ffn(torch.cat([x, x]), dense, act)


IMPLS: dict[str, Callable[[LayerWeights], Callable]] = {
    "moe_convert": impl_moe_convert,
    "moe_convert[loop]": lambda w: impl_moe_convert(w, "loop"),
    "moe_convert[grouped_mm]": lambda w: impl_moe_convert(w, "grouped_mm"),
    "deepspeed": impl_deepspeed,
    "einsum": impl_einsum,
    "hf_eager": lambda w: impl_hf(w, "eager"),
    "hf_grouped_mm": lambda w: impl_hf(w, "grouped_mm"),
    "hf_batched_mm": lambda w: impl_hf(w, "batched_mm"),
    "dense_ffn": impl_dense,
}


# --- training: each builds (x (T, d) -> y (T, d), its parameters) from trainable weights -----------
def prmoe_layer(w: LayerWeights, backend: str | None = None) -> PRMoELayer:
    """Our `PRMoELayer` (top-1, dropless, residual) holding copies of w, in train mode; `backend` forced."""
    E, d = w.router.shape
    f = 4 * d
    dense = torch.nn.Sequential(torch.nn.Linear(d, f), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(f, d))
    layer = PRMoELayer(d, Experts("mlp", E, d, f, ACTIVATIONS[ACT]), dense)
    with torch.no_grad():
        for name, t in w.stacked.items():
            getattr(layer.experts, name).copy_(t)
        layer.router.weight.copy_(w.router)
        dense[0].weight.copy_(w.dense["w_in"].t())  # nn.Linear holds [out, in]
        dense[0].bias.copy_(w.dense["b_in"])
        dense[2].weight.copy_(w.dense["w_out"].t())
        dense[2].bias.copy_(w.dense["b_out"])
        layer.coefficient.weight.copy_(w.coef_w)
        layer.coefficient.bias.copy_(w.coef_b)
    layer.experts.backend = backend
    return layer.to(dtype=w.router.dtype, device=w.router.device).train()


def train_moe_convert(w: LayerWeights, backend: str | None = None) -> tuple[Callable, list[torch.Tensor]]:
    layer = prmoe_layer(w, backend)
    return layer, list(layer.parameters())


def train_deepspeed(w: LayerWeights) -> tuple[Callable, list[torch.Tensor]]:
    layer = _deepspeed_layer(w).train()
    return (lambda x: layer(x[None])[0][0]), list(layer.parameters())


def train_hf(w: LayerWeights, backend: str) -> tuple[Callable, list[torch.Tensor]]:
    run, experts = _hf(w, backend)
    return run, [w.router, *w.dense.values(), w.coef_w, w.coef_b, *experts.parameters()]


def train_dense(w: LayerWeights) -> tuple[Callable, list[torch.Tensor]]:
    act = ACTIVATIONS[ACT]
    return (lambda x: ffn(torch.cat([x, x]), w.dense, act)), list(w.dense.values())


TRAINING_IMPLS: dict[str, Callable[[LayerWeights], tuple[Callable, list[torch.Tensor]]]] = {
    "moe_convert": train_moe_convert,
    "moe_convert[loop]": lambda w: train_moe_convert(w, "loop"),
    "moe_convert[grouped_mm]": lambda w: train_moe_convert(w, "grouped_mm"),
    "deepspeed": train_deepspeed,
    "einsum": lambda w: (impl_einsum(w), w.tensors()),
    "hf_eager": lambda w: train_hf(w, "eager"),
    "hf_grouped_mm": lambda w: train_hf(w, "grouped_mm"),
    "hf_batched_mm": lambda w: train_hf(w, "batched_mm"),
    "dense_ffn": train_dense,
}


def training_step(run: Callable, params: list[torch.Tensor]) -> Callable:
    """x (T, d), a leaf that takes gradients -> y (T, d) detached, after the loss's backward; every gradient
    (x's included) set to None first, so each call does the same work."""
    def step(x):
        for t in (*params, x):
            t.grad = None
        y = run(x)
        y.float().square().mean().backward()
        return y.detach()
    return step


def build(name: str, w: LayerWeights, backward: bool) -> Callable:
    """Implementation `name` on w: inference (x -> y), or with `backward` a training step (`training_step`)."""
    return training_step(*TRAINING_IMPLS[name](w.trainable())) if backward else IMPLS[name](w)


# --- the machine and the floor -------------------------------------------------------------------
# Read before every timed call: larger than the last-level cache, it leaves each implementation the same
# start, its weights in DRAM and no dirty lines of the previous implementation to write back first
# (after DeepSpeed's layer those cost our decode ~0.5 ms: 40 GB/s against 60, docs/benchmarks.md).
EVICT_BYTES = 256 * 2**20


def _synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued work (CUDA runs asynchronously; the CPU needs nothing)."""
    return torch.cuda.synchronize if device.type == "cuda" else lambda: None


def _median_ms(fn: Callable, repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


@dataclass
class Machine:
    gemm_gflops: float  # dense matmul rate in the bench dtype
    bandwidth_gbs: float  # memory read bandwidth (sum over a tensor far larger than the caches)


def measure_machine(d: int, dtype: torch.dtype, big: torch.Tensor, repeats: int = 5) -> Machine:
    """Best GEMM rate of a (2048, d) x (d, 4d) matmul in `dtype`; best read bandwidth summing `big` (fp32,
    far larger than the caches: the bench's `EVICT_BYTES` buffer), on `big`'s device.

    The GEMM rate is the best of torch's own matmul (MKL for fp32 in this torch build) and oneDNN's
    linear (`kernels._linear_pointwise`, what our kernels call) on plain and on packed weights: on
    AMD CPUs MKL's fp32 GEMM runs at about half of oneDNN's, and a floor measured with the slower
    library alone would not be one.
    Best, not median: the floor is a lower bound, and on a shared machine the slow samples measure
    the neighbours.
    """
    sync = _synchronizer(big.device)
    a, b = torch.randn(2048, d, dtype=dtype, device=big.device), torch.randn(d, 4 * d, dtype=dtype, device=big.device)
    gemms = [lambda: a @ b]
    if kernels.onednn_ok(a):
        gemms.append(lambda: kernels._linear_act(a, b.t(), None))
    packed = kernels.pack_matrix(b)
    if packed is not None:
        gemms.append(lambda: kernels._linear_act(a, packed, None))
    gemm_ms = min(_median_ms(g, 1, sync) for g in gemms for _ in range(repeats))
    bw_ms = min(_median_ms(big.sum, 1, sync) for _ in range(repeats))
    return Machine(2 * 2048 * d * 4 * d / gemm_ms / 1e6, big.numel() * big.element_size() / bw_ms / 1e6)


def layer_work(w: LayerWeights, x: torch.Tensor, backward: bool = False) -> tuple[int, int]:
    """(useful FLOPs, bytes of the weights every correct implementation must read) of the layer on x; with
    `backward`, of a training step: 3x the FLOPs, and the weights' gradients written too (module docstring)."""
    T, d = x.shape
    E, f = w.num_experts, 4 * d
    hit = int(_top1(w, x)[0].unique().numel())  # experts that received tokens
    flops = T * (2 * d * E + 2 * (2 * 2 * d * f) + 2 * d * 2)  # router + expert FFN + dense FFN + coefficient
    per_ffn = 2 * d * f + f + d
    weight_bytes = (hit * per_ffn + per_ffn + E * d + 2 * d + 2) * x.element_size()
    return (3 * flops, 2 * weight_bytes) if backward else (flops, weight_bytes)


def floor_ms(work: tuple[int, int], m: Machine) -> tuple[float, float, float]:
    """(floor, compute part, bytes part) in ms of `layer_work` on machine m."""
    compute, memory = work[0] / m.gemm_gflops / 1e6, work[1] / m.bandwidth_gbs / 1e6
    return max(compute, memory), compute, memory


@dataclass
class BenchRow:
    impl: str
    tokens: int
    hidden: int
    experts: int
    dtype: str
    ms: float | None
    vs_floor: float | None = None  # ms / floor ms (>= 1)
    speedup_vs_deepspeed: float | None = None  # deepspeed ms / ms (> 1: faster than DeepSpeed)
    max_err: float | None = None  # max |y - y_moe_convert| / max |y_moe_convert| (backward: and of x's gradient)
    note: str = ""
    backward: bool = False  # timed forward + backward (a training step), not inference


def check_bench_args(tokens: int, hidden: int, experts: list[int], dtype: str, impls: list[str] | None,
                     repeats: int, seed: int = 0) -> None:
    """`bench_layer`'s arguments, checked before any work (also by a recipe's bench step)."""
    if dtype not in DTYPES:
        raise MoEConvertError(f"--dtype {dtype!r} is not known; choose one of {', '.join(DTYPES)}")
    if impls is not None and not impls:
        raise MoEConvertError(f"--impls: name at least one of {', '.join(IMPLS)}")
    unknown = [i for i in impls or [] if i not in IMPLS]
    if unknown:
        raise MoEConvertError(f"--impls: unknown {', '.join(unknown)}; known: {', '.join(IMPLS)}")
    if min(tokens, hidden, *experts, repeats) < 1:
        raise MoEConvertError("bench layer: --tokens, --hidden, --experts and --repeats must be >= 1")
    check_seed(seed, "--seed")


def check_free_memory(tokens: int, hidden: int, experts: list[int], dtype: str, impls: list[str] | None,
                      backward: bool = False, device: str = "cpu") -> None:
    """The weights and activations fit in free memory (the device's, on CUDA) now (checked when the bench
    starts, not when a recipe is planned)."""
    import psutil

    copies = (1 + len(impls or IMPLS)) * (2 if backward else 1)  # the weights, one copy per implementation, grads
    size = DTYPES[dtype].itemsize
    need = copies * max(experts) * 8 * hidden * hidden * size  # w_in + w_out, f = 4d
    need += 16 * tokens * 4 * hidden * size  # a few (T, 4d) intermediates (the dense FFN doubles T)
    need += EVICT_BYTES
    available = (torch.cuda.mem_get_info(device)[0] if torch.device(device).type == "cuda"
                 else psutil.virtual_memory().available)
    if need > available:
        raise MoEConvertError(f"bench layer: T={tokens}, E={max(experts)} experts of d={hidden} need about "
                              f"{need / 1e9:.1f} GB for the weights ({copies} copies) and activations, "
                              f"{available / 1e9:.1f} GB is free; lower --tokens, --experts or --hidden, or bench "
                              f"fewer --impls")


def bench_layer(tokens: int, hidden: int, experts: list[int], dtype: str = "fp32", impls: list[str] | None = None,
                repeats: int = 5, seed: int = 0, backward: bool = False, device: str = "cpu",
                on_step: Callable[[str], None] = lambda s: None) -> tuple[Machine, list[BenchRow]]:
    """Time every implementation on the same weights and input per expert count; medians over `repeats`.
    `backward`: training steps (forward, loss, backward) instead of inference."""
    check_bench_args(tokens, hidden, experts, dtype, impls, repeats, seed)
    check_free_memory(tokens, hidden, experts, dtype, impls, backward, device)
    device = torch.device(device)
    sync = _synchronizer(device)
    no_deepspeed = False  # in the default set: its row says why it is empty
    if "deepspeed" in (impls or IMPLS):
        try:
            deepspeed_moe_class()
        except MoEConvertError:
            if impls:  # asked for by name
                raise MoEConvertError("--impls deepspeed: DeepSpeed is not installed (pip install deepspeed)") from None
            no_deepspeed = True
    impls = impls or list(IMPLS)
    torch_dtype = DTYPES[dtype]
    evict = torch.ones(EVICT_BYTES // 4, device=device)  # read before each timed call, and to measure the bandwidth
    machine = measure_machine(hidden, torch_dtype, evict)
    rows: list[BenchRow] = []
    work: dict[int, tuple[int, int]] = {}  # expert count -> `layer_work`
    with torch.inference_mode(not backward):
        for E in experts:
            w = make_weights(E, hidden, torch_dtype, seed).to(device=device)
            x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed + 1)).to(torch_dtype)
            x = x.to(device).requires_grad_(backward)
            fns, notes = {}, {}
            for name in impls:
                if name == "deepspeed" and no_deepspeed:
                    notes[name] = "skipped: DeepSpeed is not installed"
                    continue
                if name == "hf_batched_mm" and tokens * 2 * hidden * 4 * hidden * x.element_size() > BATCHED_MM_LIMIT:
                    notes[name] = "skipped: per-token weight copies exceed 2 GiB"
                    continue
                on_step(f"E={E}: set up {name}")
                fns[name] = build(name, w, backward)

            def computed(fn):  # the output and, with backward, the input's gradient, in fp32
                y = fn(x).float()
                return [y, x.grad.float()] if backward else [y]
            ref = computed(fns.get("moe_convert") or build("moe_convert", w, backward))
            times: dict[str, list[float]] = {name: [] for name in fns}
            errs = {}
            for name, fn in fns.items():  # warm up, and check every implementation computes the same layer
                got = computed(fn)
                if name != "dense_ffn":  # a cost reference only: it computes 2T tokens of one FFN
                    errs[name] = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, ref))
            order = list(fns.items())
            for r in range(repeats):  # interleaved rounds, so drift on a shared machine hits every impl alike;
                on_step(f"E={E}: round {r + 1}/{repeats}")  # each round starts one impl later: no fixed places
                for name, fn in order[r % len(order):] + order[:r % len(order)]:
                    evict.sum()  # every call starts from the same caches: cold, no lines left dirty by the one before
                    sync()
                    t = time.perf_counter()
                    fn(x)
                    sync()
                    times[name].append((time.perf_counter() - t) * 1e3)
            again = measure_machine(hidden, torch_dtype, evict)  # after the rounds too: keep the best seen
            machine = Machine(max(machine.gemm_gflops, again.gemm_gflops), max(machine.bandwidth_gbs, again.bandwidth_gbs))
            ms = {name: statistics.median(ts) for name, ts in times.items()}
            work[E] = layer_work(w, x, backward)
            for name in impls:
                row = BenchRow(name, tokens, hidden, E, dtype, ms.get(name), max_err=errs.get(name),
                               note=notes.get(name, ""), backward=backward)
                if row.ms is not None:
                    row.speedup_vs_deepspeed = ms["deepspeed"] / row.ms if "deepspeed" in ms else None
                rows.append(row)
            rows.append(BenchRow("floor", tokens, hidden, E, dtype, None, 1.0, backward=backward))
    for row in rows:  # every floor from the machine constants reported: the best seen in the whole run
        floor, compute, memory = floor_ms(work[row.experts], machine)
        if row.impl == "floor":
            row.ms, row.note = floor, (f"{'compute' if compute >= memory else 'bytes'}-bound: "
                                       f"compute {compute:.2f} ms, bytes {memory:.2f} ms")
            deepspeed = next((r.ms for r in rows if r.impl == "deepspeed" and r.experts == row.experts), None)
            row.speedup_vs_deepspeed = deepspeed / floor if deepspeed else None
        elif row.ms is not None:
            row.vs_floor = row.ms / floor
    return machine, rows
