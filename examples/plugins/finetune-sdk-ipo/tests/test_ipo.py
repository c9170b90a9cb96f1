"""finetune-sdk-ipo passes the finetune_sdk objective contract unchanged, and its loss is IPO's."""

from __future__ import annotations

import pytest

from finetune_sdk.plugin_manager import get_plugin_host
from finetune_sdk.testing import ObjectiveContract
from finetune_sdk.testing.objective_contract import LORA, PREFERENCE_ROWS, AccumulationCase


class TestIPO(ObjectiveContract):
    name = "ipo"
    case = AccumulationCase("lora", "preference", PREFERENCE_ROWS, {**LORA, "objective": "ipo", "beta": 0.5})


def test_registered_from_this_distribution():
    reg = get_plugin_host().registration("objective", "ipo")
    assert reg.distribution == "finetune-sdk-ipo" and reg.plugin == "ipo"


def test_loss_by_hand():
    import torch

    from finetune_sdk_ipo import IdentityPreferenceOptimization, log_ratio_margin

    # policy chosen -3, rejected -5; reference chosen -4, rejected -4: h = (1) - (-1) = 2; beta 0.5: (2 - 1)^2 = 1
    h = log_ratio_margin(torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0]))
    assert h.tolist() == [2.0]
    assert IdentityPreferenceOptimization().loss_at_reference({"beta": 0.25}) == pytest.approx(4.0)
