"""moe-convert: dense LM -> DeepSpeed-style PR-MoE, Mixture-of-Students distillation, fast MoE export.

Importing the package registers `PRMoEConfig` / `PRMoEForCausalLM` with transformers' `AutoConfig`
and `AutoModelForCausalLM`. Registration needs torch and transformers (seconds to import), so it
happens the moment transformers' auto modules load (at once if they already have): `import
moe_convert` itself, and so the CLI's `--help`, stays instant.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


# transformers module -> our module that registers itself with the Auto classes when imported
_REGISTER_AFTER = {
    "transformers.models.auto.configuration_auto": ".model.configuration_prmoe",
    "transformers.models.auto.modeling_auto": ".model.modeling",
}


def _register(transformers_module: str) -> None:
    # A plain import: if our module is itself mid-import (it triggered transformers), this returns
    # the partial module and its own last lines do the registration.
    importlib.import_module(_REGISTER_AFTER[transformers_module], __name__)


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
