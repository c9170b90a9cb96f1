"""The contract every reward function a plugin registers passes (``register_reward_functions``).

Plugin authors subclass it in their own test suite:

    from finetune_sdk.testing import RewardFunctionContract

    class TestExactAnswer(RewardFunctionContract):
        name = "exact_answer"
        columns = {"answer": ["4", "9"]}  # the columns of your prompt rows it reads, one value per prompt
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from finetune_sdk.plugin_manager import get_plugin_host

PROMPTS = ["What is 2 + 2?", "Name a colour."]
COMPLETIONS = ["4", "", "blue <|im_end|> </s>", "a very long answer " * 20]


class RewardFunctionContract:
    """Tests every registered reward function passes. Set ``name``; ``columns`` gives the extra columns of the
    prompt rows it reads (one value per prompt in :data:`PROMPTS`)."""

    name: ClassVar[str]
    columns: ClassVar[dict[str, list[Any]]] = {}

    def function(self) -> Any:
        return get_plugin_host().registration("reward", self.name).cls

    def test_registered_as_a_function(self) -> None:
        function = self.function()
        assert callable(function) and not isinstance(function, type)
        assert (function.__doc__ or "").strip(), "give the reward function a docstring: `finetune plugins` shows it"

    def test_returns_one_finite_float_per_completion(self) -> None:
        """Each prompt with several completions (empty, special-token strings, long ones), as GRPO calls it."""
        from finetune_sdk.objectives.reward_functions import Reward, score_completions

        prompts = [p for p in PROMPTS for _ in COMPLETIONS]
        completions = COMPLETIONS * len(PROMPTS)
        columns = {k: [v for v in values for _ in COMPLETIONS] for k, values in self.columns.items()}
        scores, _ = score_completions([Reward(self.name, self.function())], prompts, completions, columns)
        assert len(scores) == len(completions)
        assert all(len(row) == 1 and math.isfinite(row[0]) for row in scores)

    def test_a_score_does_not_depend_on_the_batch_or_row(self) -> None:
        """A completion scores the same alone as in a batch with longer completions and in another row, and the same
        completion twice in one batch gets one score: equal within :func:`finetune_sdk.models.pairwise.is_tie` (a
        reward model scoring pairs would otherwise see a preference between identical answers)."""
        from finetune_sdk.models.pairwise import is_tie
        from finetune_sdk.objectives.reward_functions import Reward, score_completions

        reward = [Reward(self.name, self.function())]
        for index, prompt in enumerate(PROMPTS):
            columns = {k: [values[index]] for k, values in self.columns.items()}
            for completion in COMPLETIONS:
                alone = score_completions(reward, [prompt], [completion], columns)[0][0][0]
                batch = [completion, *reversed(COMPLETIONS), completion]
                many = {k: v * len(batch) for k, v in columns.items()}
                scores = [row[0] for row in score_completions(reward, [prompt] * len(batch), batch, many)[0]]
                for where, score in (("first row", scores[0]), ("last row", scores[-1]),
                                     ("its own row", scores[len(COMPLETIONS) - COMPLETIONS.index(completion)])):
                    assert is_tie(score - alone, score, alone), \
                        f"{self.name}: {completion[:20]!r} scores {alone!r} alone but {score!r} in a batch ({where})"

    def test_plugin_module_imports_nothing_heavy(self) -> None:
        """``finetune --help`` imports every plugin module: torch, transformers... only inside functions."""
        from finetune_sdk.testing.contract import assert_light

        assert_light(self.function())
