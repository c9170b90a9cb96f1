"""Test helpers for finetune_sdk and its plugins: tiny models and the plugin contract suite.

Example (in a plugin's tests/test_contract.py):
    >>> from finetune_sdk.testing import TechniqueContract  # doctest: +SKIP
    >>> class TestDora(TechniqueContract):  # doctest: +SKIP
    ...     name = "dora"

pytest is needed only for the contract classes; the tiny-model helpers need torch and transformers.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ExporterContract", "FormatterContract", "ObjectiveContract", "QuantizerContract", "RewardFunctionContract", "StrategyContract",
           "TechniqueContract", "save_tiny_model", "tiny_model", "tiny_tokenizer"]


def __getattr__(name: str) -> Any:
    if name in ("FormatterContract", "QuantizerContract", "TechniqueContract"):
        from finetune_sdk.testing import contract

        return getattr(contract, name)
    if name == "ExporterContract":
        from finetune_sdk.testing import exporter_contract

        return exporter_contract.ExporterContract
    if name == "ObjectiveContract":
        from finetune_sdk.testing import objective_contract

        return objective_contract.ObjectiveContract
    if name == "RewardFunctionContract":
        from finetune_sdk.testing import reward_contract

        return reward_contract.RewardFunctionContract
    if name == "StrategyContract":
        from finetune_sdk.testing import strategy_contract

        return strategy_contract.StrategyContract
    if name in ("save_tiny_model", "tiny_model", "tiny_tokenizer"):
        from finetune_sdk.testing import tiny

        return getattr(tiny, name)
    raise AttributeError(f"module 'finetune_sdk.testing' has no attribute {name!r}")
