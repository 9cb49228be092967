"""Recipe files: the steps of a run (upcycle, train, distill, export, eval, bench), chained.

    output: runs/demo                       # the run directory (default: runs/<recipe file name>)
    steps:
      - upcycle: {source: checkpoints/tiny-gpt2, pyramid: "4,8"}
      - train: {data: "builtin:pydoc", steps: 150}
      - distill: {data: "builtin:pydoc", student_layers: -1, kd_stop: 0.5}
      - export: {format: safetensors}
      - eval: {data: "builtin:pydoc"}

Chaining: a step's input (`source` of upcycle, `model` of train/export, `teacher` of distill)
defaults to the output of the last step that produced a model; `output` defaults to
`<run dir>/<index>-<kind>`; `eval` scores every model the run has produced (the dense source
included) unless it names `models`. Overrides `kind.field=value` set a field on every step of that
kind, `N.field=value` on step N (0-based), `output=DIR` the run directory; values are read as YAML.
Each step kind maps to the dataclass that validates its fields (`STEP_KINDS`); everything is
validated before any work, and every error names the step and the field.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..convert.config import ExportJob, UpcycleJob
from ..errors import MoEConvertError, one_line
from ..model.layout import parse_int_list
from ..options import check_types
from ..training.config import DistillJob, EvalJob, TrainJob

# kind -> name of the field that takes the previous model (None: the kind takes no model)
INPUT_FIELD = {"upcycle": "source", "train": "model", "distill": "teacher", "export": "model", "eval": None,
               "bench": None}
MAKES_MODEL = ("upcycle", "train", "distill")  # kinds whose output is a model directory
# Fields the CLI takes as comma-separated integers; YAML may also write them as a number or a list.
INT_LIST_FIELDS = ("pyramid", "pyramid_split", "experts", "keep_layers")
# Fields naming files or directories: a leading ~ is the home directory, as in a shell.
PATH_FIELDS = ("source", "source_config", "model", "teacher", "data", "output", "teacher_cache", "models")


def _as_written_on_the_cli(body: dict) -> dict:
    """A step's fields in the CLI's forms: integer lists comma-separated, `~` expanded in paths."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def home(v):
        return str(Path(v).expanduser()) if isinstance(v, str) and v.startswith("~") else v

    for name in INT_LIST_FIELDS:
        v = body.get(name)
        if is_int(v) or (isinstance(v, list) and v and all(map(is_int, v))):
            body[name] = ",".join(map(str, v if isinstance(v, list) else [v]))
    for name in PATH_FIELDS:
        if name in body:
            body[name] = [home(v) for v in body[name]] if isinstance(body[name], list) else home(body[name])
    return body


@dataclass
class UpcycleStep(UpcycleJob):
    """`upcycle`'s options (`UpcycleJob`); `source_config` is a config.json that describes `source` for
    `--dry-run` where the source itself is not available (e.g. offline)."""

    source_config: str | None = None


@dataclass
class EvalStep(EvalJob):
    """`eval`'s options (`EvalJob`) for every model in `models`; `output` keeps the results."""

    output: str = field(kw_only=True)
    models: list[str] = field(default_factory=list, kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.models, list) or not all(isinstance(m, str) for m in self.models):
            raise MoEConvertError(f"models: expected a list of model directories, got {self.models!r}")
        if not self.models:
            raise MoEConvertError("models: nothing to score; name the models, or put the eval step after a step "
                                  "that makes one")


@dataclass
class BenchStep:
    output: str
    tokens: int = 4096
    hidden: int = 512
    experts: str = "8,32,128"
    dtype: str = "fp32"
    repeats: int = 3
    backward: bool = False  # time training steps (forward + backward) instead of inference

    def __post_init__(self):
        check_types(self)
        from ..inference.bench import check_bench_args

        counts = parse_int_list(self.experts, "experts")
        check_bench_args(self.tokens, self.hidden, counts, self.dtype, None, self.repeats)
        self.experts = ",".join(map(str, counts))


def _dataclass_step(cls):
    def build(d: dict):
        allowed = {f.name for f in fields(cls)}
        unknown = set(d) - allowed
        if unknown:
            raise MoEConvertError(f"unknown field(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(allowed))}")
        return cls(**d)

    return build


STEP_KINDS = {
    "upcycle": _dataclass_step(UpcycleStep),
    "train": TrainJob.from_dict,
    "distill": DistillJob.from_dict,
    "export": _dataclass_step(ExportJob),
    "eval": _dataclass_step(EvalStep),
    "bench": _dataclass_step(BenchStep),
}


@dataclass
class Step:
    index: int
    kind: str
    spec: Any  # the kind's validated dataclass (UpcycleStep, TrainJob, DistillJob, ExportJob, ...)
    input: str | None = None  # the model this step reads (None for eval/bench)

    @property
    def output(self) -> str:
        return self.spec.output


@dataclass
class Recipe:
    path: Path | None
    output: Path  # the run directory
    steps: list[Step]


def read_yaml(text: str):
    """YAML as its 1.2 core schema reads it: `3e-4` is a float and only true/false are booleans
    (PyYAML's 1.1 rules make `3e-4` a string and `no`, the documented `mixed_precision`, False)."""
    import yaml

    return yaml.load(text, Loader=_yaml12_loader())


@functools.cache
def _yaml12_loader():
    """PyYAML's safe loader with YAML 1.2's booleans and exponent floats (built once)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
                                      for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                 list("-+0123456789."))
    return Loader


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`kind.field=value`, `N.field=value` or `output=DIR` (values read as YAML) on the raw recipe."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise MoEConvertError(f"override {item!r}: expected key=value, e.g. distill.kd_stop=0.7")
        value = read_yaml(raw) if raw else ""
        if key == "output":
            data["output"] = value
            continue
        target, dot, name = key.partition(".")
        if not dot or not name:
            raise MoEConvertError(f"override {item!r}: expected kind.field=value or N.field=value")
        steps = data.get("steps") if isinstance(data.get("steps"), list) else []
        hits = [s for i, s in enumerate(steps) if isinstance(s, dict) and len(s) == 1
                and (str(i) == target or next(iter(s)) == target)]
        if not hits:
            raise MoEConvertError(f"override {item!r}: the recipe has no step {target!r}")
        for s in hits:
            body = next(iter(s.values()))
            if body is None:
                s[next(iter(s))] = body = {}
            body[name] = value
    return data


def parse_recipe(data: Any, where: str = "recipe", default_output: str | Path = "runs/recipe") -> Recipe:
    """Validate a recipe mapping and resolve its chaining; errors name the step and the field."""
    if not isinstance(data, dict) or "steps" not in data or set(data) - {"steps", "output"}:
        raise MoEConvertError(f"{where}: expected a mapping with 'steps' (and optionally 'output'), "
                              f"got keys {sorted(data) if isinstance(data, dict) else type(data).__name__}")
    if not isinstance(data["steps"], list) or not data["steps"]:
        raise MoEConvertError(f"{where}: 'steps' must be a non-empty list")
    if "output" in data and not (isinstance(data["output"], str) and data["output"].strip()):
        raise MoEConvertError(f"{where}: 'output' must name a directory, got {data['output']!r}")
    run_dir = Path(data.get("output", default_output)).expanduser()
    steps, previous, models = [], None, []
    for i, item in enumerate(data["steps"]):
        if not isinstance(item, dict) or len(item) != 1:
            raise MoEConvertError(f"{where}: step {i} must be a mapping {{kind: {{fields}}}}")
        (kind, body), = item.items()
        if kind not in STEP_KINDS:
            raise MoEConvertError(f"{where}: step {i} has unknown kind {kind!r}; known: {', '.join(STEP_KINDS)}")
        if body is not None and not isinstance(body, dict):
            raise MoEConvertError(f"{where}: step {i} ({kind}) needs a mapping of fields")
        body = _as_written_on_the_cli(dict(body or {}))
        body.setdefault("output", str(run_dir / f"{i}-{kind}"))
        input_field = INPUT_FIELD[kind]
        if input_field is not None and previous is not None:
            body.setdefault(input_field, previous)
        if kind == "eval" and not body.get("models"):
            body["models"] = list(models)
        try:
            spec = STEP_KINDS[kind](body)
        except (MoEConvertError, TypeError) as e:
            raise MoEConvertError(f"{where}: step {i} ({kind}): {e}") from None
        step = Step(i, kind, spec, body.get(input_field) if input_field else None)
        steps.append(step)
        if kind == "upcycle" and not models:
            models.append(step.input)  # the dense source is worth scoring too
        if kind in MAKES_MODEL:
            previous = step.output
            models.append(step.output)
    return Recipe(None, run_dir, steps)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read and validate a recipe file (plus `key=value` overrides) before any work starts."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MoEConvertError(f"recipe: {path} {'is a directory, not a file' if path.is_dir() else 'does not exist'}")
    try:
        data = read_yaml(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise MoEConvertError(f"recipe: {path} is not valid YAML: {one_line(e)}") from None
    recipe = parse_recipe(apply_overrides(data, list(overrides)) if overrides else data, str(path),
                          default_output=Path("runs") / path.stem)
    recipe.path = path
    return recipe
