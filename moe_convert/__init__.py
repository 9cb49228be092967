"""moe-convert: dense LM -> DeepSpeed-style PR-MoE, Mixture-of-Students distillation, fast MoE export.

Importing the package registers `PRMoEConfig` / `PRMoEForCausalLM` with transformers' `AutoConfig`
and `AutoModelForCausalLM`. Registration needs torch and transformers (seconds to import), so it
happens the moment transformers' auto modules load (at once if they already have): `import
moe_convert` itself, and so the CLI's `--help`, stays instant.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


def _register_config() -> None:
    from transformers import AutoConfig

    from .configuration_prmoe import PRMoEConfig

    AutoConfig.register(PRMoEConfig.model_type, PRMoEConfig, exist_ok=True)


def _register_model() -> None:
    from transformers import AutoModelForCausalLM

    from .modeling import PRMoEConfig, PRMoEForCausalLM

    AutoModelForCausalLM.register(PRMoEConfig, PRMoEForCausalLM, exist_ok=True)


_REGISTER_AFTER = {
    "transformers.models.auto.configuration_auto": _register_config,
    "transformers.models.auto.modeling_auto": _register_model,
}


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
            _REGISTER_AFTER[name]()

        spec.loader.exec_module = exec_then_register
        return spec


def _install() -> None:
    pending = {name: fn for name, fn in _REGISTER_AFTER.items() if name not in sys.modules}
    for name, fn in _REGISTER_AFTER.items():
        if name not in pending:
            fn()
    if pending and not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


_install()
