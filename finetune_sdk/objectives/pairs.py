"""The base of the objectives on (prompt, chosen, rejected) pairs (DPO, ORPO, SimPO, the reward model).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from finetune_sdk.data.encoding import Encoded
from finetune_sdk.formatter import PREFERENCE, Formatter
from finetune_sdk.objectives.base import Objective

if TYPE_CHECKING:
    from finetune_sdk.data.rows import Rows
    from finetune_sdk.training.plan import RunSpec, TrainingPlan


class PreferencePairs(Objective):
    """Base of the objectives on (prompt, chosen, rejected) pairs: encoded, checked and batched as pairs."""

    formatter_tasks = frozenset({PREFERENCE})
    sequences_per_example = 2
    metrics = ("eval_loss", "reward_accuracy", "reward_ties", "reward_margin", "logp_margin")

    def encode(self, rows: Rows, formatter: Formatter, tokenizer: Any, options: Mapping[str, Any]) -> Encoded:
        from finetune_sdk.data.pairs import encode_preference

        return encode_preference(rows, formatter, tokenizer, options)

    def check_encoded(self, encoded: Encoded, options: Mapping[str, Any], source: str) -> None:
        from finetune_sdk.data.checks import check_pairs

        check_pairs(encoded.examples, source)

    def collator(self, run: RunSpec, plan: TrainingPlan, tokenizer: Any) -> Any:
        from finetune_sdk.objectives.dpo_training import PairCollator

        return PairCollator(tokenizer.pad_token_id)
