"""``sft``: supervised fine-tuning, the causal-LM cross-entropy on response tokens (supervised and text
formatters; multi-task mixtures).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from finetune_sdk.data.encoding import Collator
from finetune_sdk.objectives.base import Objective

if TYPE_CHECKING:
    from finetune_sdk.data.rows import Rows
    from finetune_sdk.training.plan import RunSpec, TrainingPlan


class SupervisedFineTuning(Objective):
    """``sft``: next-token cross-entropy on response tokens; packing and length grouping apply."""

    name = "sft"
    description = "supervised fine-tuning: next-token cross-entropy on the answers"
    default = True
    chunked_loss = True
    packs = True

    def check_rows(self, rows: Rows) -> None:
        from finetune_sdk.data.checks import check_answers

        check_answers(rows.rows, rows.source)

    def collator(self, run: RunSpec, plan: TrainingPlan, tokenizer: Any) -> Any:
        if run.state.packed:
            from finetune_sdk.data.packing import PackingCollator

            row_length = None if run.state.varlen else run.options["max_length"]  # per-example attention: one row
            return PackingCollator(row_length, tokenizer.pad_token_id, varlen_kwargs=run.state.varlen)
        return Collator(tokenizer.pad_token_id)
