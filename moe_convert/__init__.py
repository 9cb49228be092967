"""moe-convert: dense LM -> DeepSpeed-style PR-MoE, Mixture-of-Students distillation, fast MoE export.

Importing the package registers `PRMoEConfig` / `PRMoEForCausalLM` with transformers' `AutoConfig`
and `AutoModelForCausalLM`, and the CPU inference kernels (`inference/kernels.py`) into the model's
backend registry (`model/routing.py`). Both need torch (seconds to import), so each happens the
moment the module it extends loads (at once if it already has): `import moe_convert` itself, and so
the CLI's `--help`, stays instant.

The tree follows the pipeline: `model/` (what a saved checkpoint's remote code needs), `convert/`
(upcycle, export, from-deepspeed, inspect), `training/` (train, distill), `inference/` (runtime,
kernels, bench), `pipeline/` (recipes), over `io.py` and `formats.py`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


# module -> our module that registers itself with it when imported
_REGISTER_AFTER = {
    "transformers.models.auto.configuration_auto": ".model.configuration_prmoe",
    "transformers.models.auto.modeling_auto": ".model.modeling",
    "moe_convert.model.routing": ".inference.kernels",  # its faster no-grad CPU ops
}


def _register(module: str) -> None:
    # A plain import: if our module is itself mid-import (it triggered `module`), this returns
    # the partial module and its own last lines do the registration.
    importlib.import_module(_REGISTER_AFTER[module], __name__)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs a registration function right after one of `_REGISTER_AFTER`'s modules executes."""

    def find_spec(self, name, path=None, target=None):
        if name not in _REGISTER_AFTER:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register(name)

        spec.loader.exec_module = exec_then_register
        return spec


def _install() -> None:
    pending = [name for name in _REGISTER_AFTER if name not in sys.modules]
    for name in _REGISTER_AFTER:
        if name not in pending:
            _register(name)
    if pending and not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


_install()
