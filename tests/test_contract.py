"""The plugin contract suite (finetune_sdk.testing) over every registered technique, quantizer and formatter."""

from __future__ import annotations

import pytest

from finetune_sdk.plugin_manager import PluginHost
from finetune_sdk.testing import FormatterContract, QuantizerContract, TechniqueContract

_host = PluginHost(autoload=False)
LR = {"full": 2e-3, "classifier": 2e-2, "reward-model": 2e-2}


def _classes(kind: str, base: type, **extra):
    for name in _host.names(kind):
        attrs = {"name": name, **{k: v(name) for k, v in extra.items()}}
        cls = type(f"Test{kind.title()}Contract_{name.replace('-', '_')}", (base,), attrs)
        if kind == "technique":
            cls = pytest.mark.slow(cls) if name not in ("lora", "classifier", "reward-model") else cls
        yield cls.__name__, cls


for _name, _cls in _classes("technique", TechniqueContract, learning_rate=lambda n: LR.get(n, 5e-3)):
    globals()[_name] = _cls
for _name, _cls in _classes("quantizer", QuantizerContract):
    globals()[_name] = _cls
for _name, _cls in _classes("formatter", FormatterContract):
    globals()[_name] = _cls


def test_every_builtin_is_covered():
    covered = {v.name for v in globals().values() if isinstance(v, type) and hasattr(v, "name") and
               issubclass(v, (TechniqueContract, QuantizerContract, FormatterContract))}
    for kind in ("technique", "quantizer", "formatter"):
        assert set(_host.names(kind)) <= covered
