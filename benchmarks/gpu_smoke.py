"""The one check to run when a GPU is at hand (about 15 minutes on one GPU):

    python benchmarks/gpu_smoke.py [--device cuda] [--quick] [--out gpu_smoke]
    python benchmarks/gpu_smoke.py --device cpu --quick --out /tmp/smoke   # a dry run of the script itself

(a) layer: the PR-MoE layer (residual on) on the device against a float64 per-token reference on the CPU, for
    each expert backend (loop, grouped_mm) x dtype (fp32, bf16) x bf16 autocast (off, on) x top-k (1, 2):
    output and every parameter's gradient, with CUDA's sync debug mode warning (count per case);
(b) demo: recipes/demo.yaml's steps through the pipeline in fp32 and in bf16 mixed precision on the device,
    beside the same runs on the CPU: step-1 CE, final perplexity, max device memory, training tokens/s;
(c) bench: `bench layer` forward and `--backward` on the device (DeepSpeed and transformers when installed);
(d) tests: the test files whose code runs on the device Accelerate picks (skipped on the CPU).
Writes results.json and summary.md into --out.
"""

import argparse
import copy
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, whatever is installed

from moe_convert.inference.bench import bench_layer  # noqa: E402
from moe_convert.model import routing  # noqa: E402
from moe_convert.model.moe import Experts, PRMoELayer  # noqa: E402

CASES = list(itertools.product(["loop", "grouped_mm"], ["fp32", "bf16"], [False, True], [1, 2]))
TEST_FILES = ["tests/test_train.py", "tests/test_distill.py", "tests/test_run.py"]


# --- (a) the layer against float64 --------------------------------------------------------------
def make_layer(E: int, d: int, f: int, top_k: int, seed: int) -> PRMoELayer:
    torch.manual_seed(seed)
    experts = Experts("mlp", E, d, f, torch.nn.GELU(approximate="tanh"), init_std=0.2)
    for name, p in experts.named_parameters():  # non-zero biases, so their gradients are checked too
        if name.startswith("b_"):
            torch.nn.init.normal_(p, std=0.1)
    dense = torch.nn.Sequential(torch.nn.Linear(d, f), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(f, d))
    layer = PRMoELayer(d, experts, dense, top_k)
    torch.nn.init.normal_(layer.router.weight, std=0.5)
    torch.nn.init.normal_(layer.coefficient.weight, std=0.3)
    return layer.train()


def reference(layer: PRMoELayer, x: torch.Tensor) -> torch.Tensor:
    """The layer token by token from its formulas (float64 weights): dropless top-k, raw probability for
    top-1, renormalised for k > 1, the residual mix."""
    probs = torch.nn.functional.linear(x, layer.router.weight).softmax(-1)  # (T, E)
    stacked, act = layer.experts.stacked(), layer.experts.act
    rows = []
    for t in range(x.shape[0]):
        top = probs[t].argsort(descending=True)[:layer.top_k].tolist()
        weights = probs[t, top] / (probs[t, top].sum() if layer.top_k > 1 else 1)
        y = sum(w * (act(x[t] @ stacked["w_in"][e] + stacked["b_in"][e]) @ stacked["w_out"][e] + stacked["b_out"][e])
                for w, e in zip(weights, top))
        c = layer.coefficient(x[t]).softmax(-1)
        rows.append(c[0] * y + c[1] * layer.mlp(x[t]))
    return torch.stack(rows)  # (T, d)


def layer_case(device: torch.device, backend: str, dtype: str, autocast: bool, top_k: int, quick: bool) -> dict:
    E, d, f, T = (6, 32, 64, 26) if quick else (8, 128, 512, 256)
    layer = make_layer(E, d, f, top_k, seed=7)
    ref_layer = copy.deepcopy(layer).double()
    layer = layer.to(device, torch.bfloat16 if dtype == "bf16" else torch.float32)
    layer.experts.backend = backend
    x = torch.randn(T, d, dtype=torch.float64)
    grad_out = torch.randn(T, d, dtype=torch.float64)
    routing._GROUPED_MM_FAILED.discard((device.type, next(layer.parameters()).dtype))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                y = layer(x.to(device, next(layer.parameters()).dtype))
            (y.double() * grad_out.to(device)).sum().backward()
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode(0)
    syncs = sum("synchroniz" in str(w.message) for w in seen)
    ref_y = reference(ref_layer, x)
    (ref_y * grad_out).sum().backward()
    errors = {"output": y.detach().double().cpu(), **{n: p.grad.double().cpu() for n, p in layer.named_parameters()}}
    refs = {"output": ref_y.detach(), **{n: p.grad for n, p in ref_layer.named_parameters()}}
    rel = {n: float((got - refs[n]).norm() / refs[n].norm().clamp_min(1e-12)) for n, got in errors.items()}
    tol = 1e-5 if dtype == "fp32" and not autocast else 3e-2  # fp32 rounding; bf16 products
    worst = max(rel, key=rel.get)
    return {"backend": backend, "dtype": dtype, "autocast": autocast, "residual": True, "top_k": top_k,
            "max_rel_err": rel[worst], "worst": worst, "tolerance": tol, "sync_warnings": syncs,
            "grouped_mm_fell_back": backend == "grouped_mm" and bool(routing._GROUPED_MM_FAILED),
            "passed": rel[worst] <= tol}


# --- (b) the demo recipe -------------------------------------------------------------------------
def demo_overrides(quick: bool) -> list[str]:
    logged = ["train.log_every=1", "distill.log_every=1"]  # step 1's CE is in the metrics
    if not quick:
        return logged
    return logged + [f"{kind}.{key}" for kind in ("train", "distill") for key in
                     ("steps=3", "batch_size=4", "warmup_steps=1", "eval_every=0", "save_every=0")] + ["eval.max_windows=8"]


def start_demo(device: str, precision: str, run_dir: Path, quick: bool) -> subprocess.Popen:
    """`moe-convert run recipes/demo.yaml` in its own process: on the CPU, CUDA hidden from it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    args = [sys.executable, "-m", "moe_convert", "run", "recipes/demo.yaml", f"output={run_dir}",
            f"train.mixed_precision={precision}", f"distill.mixed_precision={precision}", *demo_overrides(quick)]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def demo_result(proc: subprocess.Popen, run_dir: Path) -> dict:
    _, err = proc.communicate()
    if proc.returncode != 0:
        return {"passed": False, "error": err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"}
    state = json.loads((run_dir / "run_state.json").read_text())
    train = next(s for s in state.values() if s["kind"] == "train")
    evals = next(s for s in state.values() if s["kind"] == "eval")["result"]
    records = [json.loads(line) for kind in ("train", "distill") for step in state.values() if step["kind"] == kind
               for line in (Path(step["result"].get("output") or step["settings"]["output"]) / "metrics.jsonl")
               .read_text().splitlines()]
    first = next(r for r in records if r["kind"] == "train" and r["step"] == 1)
    memory = [r["gpu_max_gb"] for r in records if "gpu_max_gb" in r]
    return {"passed": True, "step1_ce": first["ce"], "final_ppl": evals[-1]["ppl"],
            "max_device_gb": max(memory) if memory else None, "train_tokens_per_s": train["result"]["tokens_per_s"]}


def demo_section(device: str, quick: bool, tmp: Path) -> list[dict]:
    """Each precision on the device and on the CPU; with a device, the CPU runs go alongside its runs."""
    runs = {(where, p): tmp / f"demo-{where}-{p}" for p in ("no", "bf16") for where in dict.fromkeys([device, "cpu"])}
    results = {}
    if device != "cpu":
        cpu = {key: start_demo("cpu", key[1], run_dir, quick) for key, run_dir in runs.items() if key[0] == "cpu"}
    for key, run_dir in runs.items():
        if key[0] == device:
            results[key] = demo_result(start_demo(device, key[1], run_dir, quick), run_dir)
    if device != "cpu":
        results |= {key: demo_result(proc, runs[key]) for key, proc in cpu.items()}
    return [{"precision": p, "device": results[device, p], "cpu": results["cpu", p]} for p in ("no", "bf16")]


# --- (c) bench layer, (d) tests ------------------------------------------------------------------
def bench_section(device: str, quick: bool) -> list[dict]:
    tokens, hidden, experts, repeats = (64, 32, [4], 1) if quick else (4096, 512, [8, 32], 3)
    rows = []
    for dtype in ("fp32",) if quick else ("fp32", "bf16"):
        for backward in (False, True):
            machine, got = bench_layer(tokens, hidden, experts, dtype, repeats=repeats, backward=backward, device=device)
            rows += [asdict(r) | asdict(machine) for r in got]
    return rows


def tests_section(device: str) -> dict:
    if device == "cpu":
        return {"skipped": "the CPU runs them in the ordinary test suite", "files": TEST_FILES}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", *TEST_FILES], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"))
    return {"files": TEST_FILES, "exit_code": proc.returncode, "summary": proc.stdout.strip().splitlines()[-1:]}


def summary(results: dict) -> str:
    def num(v, spec=".3g"):
        return "-" if v is None else format(v, spec)

    lines = [f"# GPU smoke check on {results['device_name']}", "", "## Layer vs float64", "",
             "| backend | dtype | autocast | top-k | max rel err | worst | sync warnings | passed |", "|---|---|---|---:|---:|---|---:|---|"]
    lines += [f"| {c['backend']}{' (fell back to loop)' if c['grouped_mm_fell_back'] else ''} | {c['dtype']} | "
              f"{c['autocast']} | {c['top_k']} | {c['max_rel_err']:.1e} | {c['worst']} | {c['sync_warnings']} | {c['passed']} |"
              for c in results["layer"]]
    lines += ["", "## Demo recipe (device / CPU)", "",
              "| precision | step-1 CE | final ppl | max device GB | train tokens/s |", "|---|---|---|---:|---|"]
    for r in results["demo"]:
        dev, cpu = r["device"], r["cpu"]
        if not (dev["passed"] and cpu["passed"]):
            lines.append(f"| {r['precision']} | failed: {dev.get('error') or cpu.get('error')} | | | |")
            continue
        lines.append(f"| {r['precision']} | {dev['step1_ce']:.4f} / {cpu['step1_ce']:.4f} | {dev['final_ppl']:.2f} / "
                     f"{cpu['final_ppl']:.2f} | {num(dev['max_device_gb'])} | {dev['train_tokens_per_s']:,.0f} / "
                     f"{cpu['train_tokens_per_s']:,.0f} |")
    lines += ["", "## bench layer", "", "| dtype | backward | E | impl | ms | x floor | max rel err | note |",
              "|---|---|---:|---|---:|---:|---:|---|"]
    lines += [f"| {r['dtype']} | {r['backward']} | {r['experts']} | {r['impl']} | {num(r['ms'])} | {num(r['vs_floor'])} | "
              f"{num(r['max_err'], '.1e')} | {r['note']} |" for r in results["bench"]]
    t = results["tests"]
    lines += ["", "## Tests", "", f"{' '.join(t['files'])}: {t.get('skipped') or t['summary']} (exit {t.get('exit_code', '-')})"]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where to run (cpu: a dry run)")
    ap.add_argument("--quick", action="store_true", help="small layer, demo and bench sizes")
    ap.add_argument("--out", type=Path, default=Path("gpu_smoke"), help="directory for results.json and summary.md")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here; --device cpu runs the dry check")
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = {"device": args.device, "quick": args.quick,
               "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    results["layer"] = [layer_case(device, *case, quick=args.quick) for case in CASES]
    print(f"layer: {sum(c['passed'] for c in results['layer'])}/{len(CASES)} cases passed", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results["demo"] = demo_section(args.device, args.quick, Path(tmp))
    print(f"demo: {sum(r['device']['passed'] and r['cpu']['passed'] for r in results['demo'])}/2 precisions ran", flush=True)
    results["bench"] = bench_section(args.device, args.quick)
    print(f"bench: {len(results['bench'])} rows", flush=True)
    results["tests"] = tests_section(args.device)
    results["seconds"] = time.perf_counter() - start
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "summary.md").write_text(summary(results))
    print(f"{results['seconds']:.0f} s; {args.out / 'summary.md'}")


if __name__ == "__main__":
    main()
