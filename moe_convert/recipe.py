"""Recipe files: YAML listing steps, each `{kind: {fields}}`, validated before anything runs.

    steps:
      - train: {model: runs/init, data: "builtin:pydoc", output: checkpoints/tiny-gpt2, steps: 600}

Each step kind maps to the dataclass that validates its fields (`STEP_KINDS`); adding a kind
(upcycle, distill, export, ...) is adding an entry. Top-level keys other than `steps` are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import MoEConvertError


def _train_step(fields: dict):
    from .train import TrainJob

    return TrainJob.from_dict(fields)


STEP_KINDS: dict[str, Callable[[dict], Any]] = {"train": _train_step}


@dataclass
class Step:
    kind: str
    spec: Any  # the kind's validated dataclass, e.g. TrainJob


@dataclass
class Recipe:
    path: Path
    steps: list[Step]


def parse_recipe(data: Any, where: str = "recipe") -> list[Step]:
    if not isinstance(data, dict) or set(data) != {"steps"}:
        raise MoEConvertError(f"{where}: expected a mapping with exactly one key, 'steps'")
    if not isinstance(data["steps"], list) or not data["steps"]:
        raise MoEConvertError(f"{where}: 'steps' must be a non-empty list")
    steps = []
    for i, item in enumerate(data["steps"]):
        if not isinstance(item, dict) or len(item) != 1:
            raise MoEConvertError(f"{where}: step {i} must be a mapping {{kind: {{fields}}}}")
        (kind, fields), = item.items()
        if kind not in STEP_KINDS:
            raise MoEConvertError(f"{where}: step {i} has unknown kind {kind!r}; known: {', '.join(STEP_KINDS)}")
        if not isinstance(fields, dict):
            raise MoEConvertError(f"{where}: step {i} ({kind}) needs a mapping of fields")
        try:
            steps.append(Step(kind, STEP_KINDS[kind](fields)))
        except MoEConvertError as e:
            raise MoEConvertError(f"{where}: step {i} ({kind}): {e}") from None
        except TypeError as e:
            raise MoEConvertError(f"{where}: step {i} ({kind}): {e}") from None
    return steps


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; a one-line error names the step and field at fault."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MoEConvertError(f"recipe: {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise MoEConvertError(f"recipe: {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return Recipe(path, parse_recipe(data, str(path)))
