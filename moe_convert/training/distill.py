"""Mixture-of-Students: build a shallower student from a (PR-MoE or dense) teacher, and the KD loss.

Student construction (Mixture-of-Students with staged KD, arXiv 2201.05596): the student keeps a
subset of the teacher's decoder layers in order: those `--keep-layers` names, or all but `k` chosen
by `--drop-by` (`layer_drop.py`: measured on the teacher, or the paper's rule). A kept layer stays
MoE with its expert count, so the pyramid is preserved.
"""

from __future__ import annotations

import json
import statistics
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

from ..errors import MoEConvertError
from ..io import DTYPES
from ..model.layout import parse_int_list
from ..model.modeling import host_spec
from .config import DistillJob
from . import deepspeed_engine
from .engines import module_bytes, reshard, shard
from .layer_drop import DropChoice, calibration_windows, choose_dropped, front_kept
from .teacher_cache import TeacherCache
from .train import (METRICS, Trainer, TrainResult, causal_lm_loss, clear_output, load_model, prepare_job,
                    release_memory)


@dataclass
class StudentPlan:
    """Which teacher layer each student layer comes from, and the student's MoE layers."""

    teacher_depth: int
    kept: list[int]  # kept[i] = teacher layer of student layer i
    moe_layers: list[int]  # student indices of MoE layers
    num_experts: list[int]

    @property
    def depth(self) -> int:
        return len(self.kept)

    @property
    def dropped(self) -> list[int]:
        return [t for t in range(self.teacher_depth) if t not in self.kept]


def student_depth(teacher_depth: int, student_layers: int) -> int:
    """`-k` means teacher depth minus k; a positive number is the absolute depth."""
    depth = teacher_depth + student_layers if student_layers < 0 else student_layers
    if not 0 < depth < teacher_depth:
        raise MoEConvertError(
            f"student_layers: the student must have between 1 and {teacher_depth - 1} layers "
            f"(teacher has {teacher_depth}), got {student_layers} -> {depth}"
        )
    return depth


DEFAULT_STUDENT_LAYERS = -1  # a student one layer shallower than its teacher


def plan_student(teacher_config, student_layers: int | None, keep_layers: str | list[int] | None = None) -> StudentPlan:
    """The student's layer plan: `student_layers` deep (None: `DEFAULT_STUDENT_LAYERS`) by the `front`
    rule, or the teacher layers `keep_layers` names (then `student_layers`, if given, must agree)."""
    host, moe = _host_and_moe(teacher_config)
    L = host.num_hidden_layers
    if keep_layers is not None:
        kept = parse_int_list(keep_layers, "keep_layers")
        if sorted(set(kept)) != kept or not all(0 <= t < L for t in kept):
            raise MoEConvertError(f"keep_layers: must be increasing teacher layer indices in 0..{L - 1}, got {kept}")
        if not 0 < len(kept) < L:
            raise MoEConvertError(f"keep_layers: must keep between 1 and {L - 1} layers, got {len(kept)}")
        if student_layers is not None and student_depth(L, student_layers) != len(kept):
            raise MoEConvertError(f"keep_layers keeps {len(kept)} layers, student_layers {student_layers} asks for "
                                  f"{student_depth(L, student_layers)}; give one of them")
    else:
        kept = front_kept(L, student_depth(L, DEFAULT_STUDENT_LAYERS if student_layers is None else student_layers))
    moe_layers = [i for i, t in enumerate(kept) if t in moe]
    return StudentPlan(L, kept, moe_layers, [moe[kept[i]] for i in moe_layers])


DROP_FILE = "layer_drop.json"  # the measured choice in the output: a resumed run keeps its student


def measure_plan(job: DistillJob, config, teacher, train: torch.Tensor,
                 recorded: Path | None = None) -> tuple[StudentPlan, DropChoice | None]:
    """The job's student plan and, for `--drop-by measured`, the choice behind it: `choose_dropped` on a
    calibration sample of the training windows `train` (N, S), or the choice `recorded` holds."""
    plan = plan_student(config, job.student_layers, job.keep_layers)
    if job.drop_rule != "measured":
        return plan, None
    if recorded is not None and recorded.is_file():
        choice = DropChoice.from_dict(json.loads(recorded.read_text()))
    else:
        choice = choose_dropped(teacher, calibration_windows(train, job.config.seed), plan.teacher_depth - plan.depth)
    return plan_student(config, None, choice.kept), choice


def preview_plan(job: DistillJob) -> tuple[StudentPlan, DropChoice | None]:
    """`distill --dry-run`: `measure_plan` without touching the output (loads the teacher and the data
    only where `--drop-by measured` asks)."""
    from accelerate import PartialState

    from ..convert.summary import load_config
    from ..io import load_tokenizer
    from .train import check_job_for_model, cpu_only, load_job_data

    config = load_config(job.model)
    if job.drop_rule != "measured":
        return measure_plan(job, config, None, None)
    check_job_for_model(job, config)
    data = load_job_data(job, load_tokenizer(job.model), PartialState(cpu=cpu_only()), config)
    return measure_plan(job, config, load_model(job.model), data.train)


def _host_and_moe(config) -> tuple:
    """(host config, {teacher MoE layer: experts}) for a PR-MoE or a dense config."""
    if getattr(config, "model_type", None) == "prmoe":
        return config.text_config, dict(zip(config.moe_layers, config.num_experts))
    host_spec(config.model_type)  # a clear error for hosts we cannot build students of
    return config, {}


def student_config(teacher_config, plan: StudentPlan):
    """The teacher's config with the student's depth (and MoE layout when the teacher is PR-MoE)."""
    host, _ = _host_and_moe(teacher_config)
    host = type(host).from_dict(host.to_dict())
    host.num_hidden_layers = plan.depth
    if getattr(host, "layer_types", None):  # per-layer attention kinds (Mistral/Qwen2 sliding windows)
        host.layer_types = [host.layer_types[t] for t in plan.kept]
    if getattr(teacher_config, "model_type", None) != "prmoe":
        return host
    cfg = type(teacher_config).from_dict(teacher_config.to_dict())
    cfg.text_config = host
    cfg.moe_layers, cfg.num_experts = plan.moe_layers, plan.num_experts
    cfg.provenance = {**teacher_config.provenance, "student_of_layers": plan.kept}
    cfg.layout  # validate
    return cfg


def check_student_init(teacher_config, plan: StudentPlan, init: str) -> None:
    """`init="teacher"` copies layers to new indices: refused where a layer's index is part of what it
    computes (GPT-2 with `scale_attn_by_inverse_layer_idx` scales attention by 1 / (index + 1))."""
    if init not in ("teacher", "scratch"):
        raise MoEConvertError(f"student_init: must be 'teacher' or 'scratch', got {init!r}")
    host, _ = _host_and_moe(teacher_config)
    moved = plan.kept != list(range(len(plan.kept)))
    if init == "teacher" and moved and getattr(host, "scale_attn_by_inverse_layer_idx", False):
        raise MoEConvertError("student_init: this GPT-2 scales each layer's attention by 1 / (layer index + 1) "
                              "(scale_attn_by_inverse_layer_idx), so a copied layer would compute otherwise at its "
                              "new index; keep the first layers (--keep-layers 0,1,...) or use --student-init scratch")


def build_student(teacher: torch.nn.Module, plan: StudentPlan, init: str = "teacher", seed: int = 0):
    """A student model; `init="teacher"` copies the kept layers, embeddings, final norm and head."""
    check_student_init(teacher.config, plan, init)
    cfg = student_config(teacher.config, plan)
    torch.manual_seed(seed)
    student = type(teacher)(cfg)
    if init == "teacher":
        host, _ = _host_and_moe(teacher.config)
        prefix = ("host." if cfg.model_type == "prmoe" else "") + host_spec(host.model_type).layers + "."
        student.load_state_dict(remap_layers(teacher.state_dict(), prefix, plan.kept), strict=True)
    return student


def remap_layers(state: dict, prefix: str, kept: list[int]) -> dict:
    """Keep the tensors of layers `kept` (renumbered 0..n-1) and every non-layer tensor."""
    new_index = {t: i for i, t in enumerate(kept)}
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        layer, rest = key[len(prefix):].split(".", 1)
        if int(layer) in new_index:
            out[f"{prefix}{new_index[int(layer)]}.{rest}"] = value
    return out


def kd_loss(student_logits, teacher_logits, labels, alpha: float, temperature: float) -> dict[str, torch.Tensor]:
    """(1 - a) CE + a T^2 KL(p_teacher^T || p_student^T), both over the same non-padding positions.

    logits (B, S, V) predict the next token; labels (B, S) with -100 at padding, as transformers'
    causal-LM loss takes them (shifted here). Returns `ce`, `kd` and their mix `loss`. Computed in
    fp32 over blocks of positions (`_CEAndKD`): beside the student's logits of the scored positions it
    holds one block's (rows, V) temporaries, not several (N, V) fp32 tensors for the backward.
    """
    mask = labels[:, 1:] != -100  # (B, S-1)
    s = student_logits[:, :-1][mask]  # (N, V) in the logits' dtype
    t = teacher_logits[:, :-1][mask]
    ce_sum, kd_sum = _CEAndKD.apply(s, t, labels[:, 1:][mask], temperature)
    n = max(s.shape[0], 1)
    ce, kd = ce_sum / n, temperature**2 * kd_sum / n
    return {"ce": ce, "kd": kd, "loss": (1 - alpha) * ce + alpha * kd}


KD_BLOCK_BYTES = 64 * 2**20  # fp32 (rows, V) temporaries per block of positions in `_CEAndKD`


class _CEAndKD(torch.autograd.Function):
    """(sum of CE, sum of KL(p_t^T || p_s^T)) over positions, student logits s and teacher logits t (N, V),
    targets (N,), temperature T. Both sums in fp32, a block of rows at a time; the backward recomputes
    each block's softmaxes from s and t instead of keeping them:
    d CE / d s = softmax(s) - onehot(target),  d KL / d s = (softmax(s / T) - softmax(t / T)) / T."""

    @staticmethod
    def forward(ctx, s, t, target, temperature):
        ctx.save_for_backward(s, t, target)
        ctx.temperature = temperature
        sums = torch.zeros(2, dtype=torch.float32, device=s.device)
        for rows in _blocks(s):
            sb, tb = s[rows].float(), t[rows].float()
            sums[0] += F.cross_entropy(sb, target[rows], reduction="sum")
            log_pt = F.log_softmax(tb / temperature, dim=-1)
            sums[1] += (log_pt.exp() * (log_pt - F.log_softmax(sb / temperature, dim=-1))).sum()
        return sums[0], sums[1]

    @staticmethod
    def backward(ctx, grad_ce, grad_kd):
        s, t, target = ctx.saved_tensors
        temperature = ctx.temperature
        grad = torch.empty_like(s)
        for rows in _blocks(s):
            sb, tb = s[rows].float(), t[rows].float()
            g = F.softmax(sb, dim=-1).mul_(grad_ce)
            g[torch.arange(g.shape[0], device=g.device), target[rows]] -= grad_ce
            g += (F.softmax(sb / temperature, dim=-1) - F.softmax(tb / temperature, dim=-1)) * (grad_kd / temperature)
            grad[rows] = g
        return grad, None, None, None


def _blocks(x: torch.Tensor) -> list[slice]:
    """Row blocks of x (N, V) whose fp32 copies fit `KD_BLOCK_BYTES`."""
    step = max(1, KD_BLOCK_BYTES // (4 * max(x.shape[-1], 1)))
    return [slice(i, i + step) for i in range(0, x.shape[0], step)]


# Stands in for -inf where a token is masked out of a logsumexp: finite, so a position whose top K hold
# every token (K = V) gives exp(...) = 0 and finite gradients instead of -inf - (-inf) = nan.
_MASKED = -1e30


def kd_loss_top_k(student_logits, top_values, top_ids, rest_lse, labels, alpha: float,
                  temperature: float) -> dict[str, torch.Tensor]:
    """`kd_loss` with the teacher known by its K largest logits per position, top_values and top_ids
    (B, S, K), and rest_lse (B, S): logsumexp / T of its other logits (`top_k_of`). KL runs over K + 1
    outcomes: the K tokens and "any other token", whose probability is what the K leave (for the student,
    what its full softmax puts outside them). Everything is in log space, so a mass of 1e-30 outside the
    top K is still scored as such (1 - sum(p) rounds it to 0). With K = V this is `kd_loss` exactly."""
    mask = labels[:, 1:] != -100  # (B, S-1)
    s = student_logits[:, :-1][mask].float()  # (N, V)
    ids = top_ids[:, :-1][mask]  # (N, K)
    ce = F.cross_entropy(s, labels[:, 1:][mask])
    st = s / temperature
    lse_s = st.logsumexp(-1)  # (N,)
    log_ps = st.gather(-1, ids) - lse_s[:, None]  # (N, K)
    log_ps_rest = st.scatter(-1, ids, _MASKED).logsumexp(-1) - lse_s  # (N,)
    vt = top_values[:, :-1][mask].float() / temperature  # (N, K)
    rest_t = rest_lse[:, :-1][mask].float()  # (N,)
    lse_t = torch.logaddexp(vt.logsumexp(-1), rest_t)
    log_pt, log_pt_rest = vt - lse_t[:, None], rest_t - lse_t
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1) + log_pt_rest.exp() * (log_pt_rest - log_ps_rest)
    kd = temperature**2 * kl.mean()
    return {"ce": ce, "kd": kd, "loss": (1 - alpha) * ce + alpha * kd}


def top_k_of(teacher_logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, ...]:
    """What `kd_loss_top_k` needs of teacher logits (B, S, V): values and ids (B, S, K), and the
    logsumexp / T of the logits outside the top K (B, S)."""
    values, ids = teacher_logits.topk(k, dim=-1)
    return values, ids, (teacher_logits.float() / temperature).scatter_(-1, ids, _MASKED).logsumexp(-1)


# --- the staged-KD run ---------------------------------------------------------------------------


class StagedKD:
    """The staged-KD loss and its switch, as a `Trainer` plug-in (`loss_fn`, `on_step`).

    Whether step `s` uses KD depends on `s` alone, so a resume continues exactly across the switch.
    At the switch the teacher is dropped and its memory released; later steps never touch it.
    """

    def __init__(self, teacher, kd_steps: int, alpha: float, temperature: float, top_k: int | None = None,
                 cache: TeacherCache | None = None):
        self.teacher, self.kd_steps, self.alpha, self.temperature = teacher, kd_steps, alpha, temperature
        self.top_k, self.cache = top_k, cache  # top-K KD (`kd_loss_top_k`), its logits kept in `cache`
        self.autocast = nullcontext  # the run's mixed precision for the teacher (`Trainer.accelerator.autocast`)

    def on_step(self, step: int) -> None:
        if step >= self.kd_steps and self.teacher is not None:
            self.teacher = None
            release_memory()

    def loss(self, model, batch: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        # resident memory of this process, logged so the drop at the switch shows in metrics.jsonl
        rss = torch.tensor(psutil.Process().memory_info().rss / 1e9)
        if self.teacher is None:
            return {**causal_lm_loss(model, batch, step), "kd_on": torch.zeros(()), "rss_gb": rss}
        out = model(input_ids=batch)
        # clone: inference-mode tensors cannot take part in the student's autograd graph
        if self.top_k is None:
            logs = kd_loss(out.logits, self._teacher_logits(batch).clone(), batch, self.alpha, self.temperature)
        else:
            kept = self.cache.get(batch) if self.cache else [None] * len(batch)  # per window: entry or None
            missing = [i for i, entry in enumerate(kept) if entry is None]
            logs = {"teacher_cached": torch.tensor(float(not missing))}
            if missing:  # the teacher runs on the whole batch, as in a run that would have filled them all
                values, ids, rest = top_k_of(self._teacher_logits(batch), self.top_k, self.temperature)
                if self.cache:
                    self.cache.put(batch[missing], values[missing], ids[missing], rest[missing])
                for i, entry in enumerate(kept):  # kept windows give what the run that filled them computed
                    if entry is not None:
                        for t, v in zip((values, ids, rest), entry):
                            t[i] = v.to(t.device)
            else:
                values, ids, rest = (torch.stack([entry[j] for entry in kept]).to(batch.device) for j in range(3))
            logs |= kd_loss_top_k(out.logits, values, ids, rest, batch, self.alpha, self.temperature)
        aux = getattr(out, "aux_loss", None)
        if aux is not None:
            logs["aux"] = aux
            logs["loss"] = logs["loss"] + _unwrap(model).config.aux_loss_coef * aux
        return {**logs, "kd_on": torch.ones(()), "rss_gb": rss}

    @torch.inference_mode()
    def _teacher_logits(self, batch: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            logits = self.teacher(input_ids=batch).logits  # (B, S, V)
        reshard(self.teacher)
        return logits


def _unwrap(model):
    return getattr(model, "module", model)


@dataclass
class DistillResult:
    plan: StudentPlan
    teacher: dict  # layers, total/active params, eval loss/ppl
    student: dict
    drop: DropChoice | None  # `--drop-by measured`: the scores behind `plan`
    kd_steps: int
    step_seconds: dict[str, float | None]  # median step time while KD is on / after the switch
    train: TrainResult

    def to_dict(self) -> dict:
        return asdict(self)


def _params(config) -> dict:
    from ..convert.summary import summarize_config

    s = summarize_config(config)
    return {"total_params": s.total_params, "active_params": s.active_params}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _teacher_cache(job: DistillJob, teacher_config, fingerprint: str) -> TeacherCache:
    """The cache `--teacher-cache` names, checked against the teacher (before any output is touched)."""
    if getattr(teacher_config, "capacity_factor", None) is not None:
        raise MoEConvertError("teacher_cache: the teacher drops tokens past a capacity factor, so a window's logits "
                              "depend on the batch it came in; a cache cannot stand in for it")
    root = Path(job.teacher_cache).resolve()
    for other in (Path(job.model), Path(job.output)):
        if root == other.resolve() or other.resolve() in root.parents:
            raise MoEConvertError(f"teacher_cache: {job.teacher_cache} is inside {other}; give a directory of its own")
    return TeacherCache(root, fingerprint, job.kd_top_k, job.temperature, job.teacher_dtype)


def run_distill(job: DistillJob, *, resume: bool = False, stop_after: int | None = None, overwrite: bool = False,
                progress: bool = True) -> DistillResult:
    """The `distill` command: plan and build the student, train it with staged KD, save it."""
    from ..convert.summary import load_config

    out = Path(job.output)
    config = load_config(job.model)  # the plan, the data and a resume are checked before the teacher loads
    plan = plan_student(config, job.student_layers, job.keep_layers)
    check_student_init(config, plan, job.student_init)
    state, tokenizer, data, settings = prepare_job(job, config, resume=resume, stop_after=stop_after,
                                                   overwrite=overwrite)
    cache = _teacher_cache(job, config, settings["teacher"]) if job.teacher_cache else None
    teacher = load_model(job.model)
    plan, drop = measure_plan(job, config, teacher, data.train, out / DROP_FILE if resume else None)
    student = build_student(teacher, plan, job.student_init, seed=job.config.seed)
    clear_output(state, out, resume, overwrite)  # every input and option checked: only now is anything removed
    kd = StagedKD(teacher if job.kd_steps > 0 else None, job.kd_steps, job.alpha, job.temperature,
                  job.kd_top_k, cache)
    trainer = Trainer(student, data, job.config, out, loss_fn=kd.loss, on_step=kd.on_step, settings=settings,
                      progress=progress, held=lambda: {"teacher": module_bytes(kd.teacher)})
    kd.autocast = trainer.accelerator.autocast
    if trainer.deepspeed:  # a PR-MoE teacher's experts split as the student's, over the engine's ep groups
        deepspeed_engine.join_ep_groups(deepspeed_engine.to_deepspeed_moe(teacher, job.config.ep_size))
    teacher.to(trainer.accelerator.device, DTYPES[job.teacher_dtype]).eval().requires_grad_(False)  # one copy
    if trainer.sharded:  # frozen, so no gradients or optimizer state: 1/N of its weights per process
        shard(teacher)
    teacher_eval_file = out / "teacher_eval.json"
    if resume and teacher_eval_file.exists():
        teacher_eval = json.loads(teacher_eval_file.read_text())
    else:  # on the run's device, sharded over its processes, the windows the student is scored on
        teacher_eval = trainer.evaluate(teacher)
    teacher_row = {"layers": teacher.config.get_text_config().num_hidden_layers, **_params(teacher.config),
                   "eval_loss": teacher_eval["loss"], "eval_ppl": teacher_eval["ppl"]}
    del teacher  # from here the StagedKD plug-in holds the only reference
    if trainer.accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        teacher_eval_file.write_text(json.dumps(teacher_eval))
        if drop is not None:
            (out / DROP_FILE).write_text(json.dumps(asdict(drop), indent=1))
    result = trainer.fit(resume=resume, stop_after=stop_after)
    if result.steps == job.config.steps:
        trainer.save_model(tokenizer, DTYPES[job.save_dtype])

    tokens_per_step = job.config.batch_size * job.seq_len
    records = [json.loads(line) for line in (out / METRICS).read_text().splitlines()] if (out / METRICS).exists() else []
    times = {"kd": [], "ce": []}
    for r in records:
        if r.get("kind") == "train" and r.get("tokens_per_s"):
            times["kd" if r.get("kd_on") else "ce"].append(tokens_per_step / r["tokens_per_s"])
    student_cfg = _unwrap(trainer.model).config
    trainer.release()
    student_row = {"layers": plan.depth, **_params(student_cfg), "eval_loss": result.eval_loss,
                   "eval_ppl": result.eval_ppl}
    return DistillResult(plan, teacher_row, student_row, drop, job.kd_steps,
                         {phase: _median(v) for phase, v in times.items()}, result)
