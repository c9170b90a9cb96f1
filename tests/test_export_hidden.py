"""Faults a tester found in the GGUF export: Modelfile parameters and CLI edge cases."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from finetune_sdk.exporting.model_settings import modelfile_parameters


def _parameters(tmp_path, generation):
    (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return modelfile_parameters(tmp_path, SimpleNamespace(max_position_embeddings=2048),
                                {"options": {"max_length": 512}}).splitlines()


@pytest.mark.parametrize("generation", [{"do_sample": False, "temperature": 0.6, "top_p": 0.9, "top_k": 40},
                                        {"temperature": 0.6, "top_p": 0.9}])
def test_a_greedy_generation_config_exports_greedy_not_its_ignored_temperature(tmp_path, generation):
    """transformers ignores temperature/top_p/top_k unless do_sample is true: the Modelfile must not sample."""
    lines = _parameters(tmp_path, {**generation, "repetition_penalty": 1.1})
    assert lines == ["PARAMETER num_ctx 512", "PARAMETER temperature 0", "PARAMETER repeat_penalty 1.1"]


def test_a_sampling_generation_config_exports_its_values(tmp_path):
    lines = _parameters(tmp_path, {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 40})
    assert lines == ["PARAMETER num_ctx 512", "PARAMETER temperature 0.6", "PARAMETER top_p 0.9",
                     "PARAMETER top_k 40"]
    assert _parameters(tmp_path, {"bos_token_id": 1}) == ["PARAMETER num_ctx 512"]
