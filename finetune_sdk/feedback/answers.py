"""What a rater answers: the two rating modes and the answers an ``ask`` returns besides a thumb or an index (skip,
quit, a tie, both bad, a written answer). The session (:mod:`finetune_sdk.feedback.session`), the terminal rater
(:mod:`finetune_sdk.feedback.rating_prompt`), the row builder (:mod:`finetune_sdk.feedback.rating_record`) and the
studio's rating page share them from here.

Example:
    >>> from finetune_sdk.feedback.answers import Edited, SKIP
    >>> Edited("A better answer.").completion, SKIP
    ('A better answer.', 'skip')
"""

from __future__ import annotations

from dataclasses import dataclass

#: One sampled answer, thumbs up or down (KTO rows).
THUMBS = "thumbs"
#: Two sampled answers, the better one (preference rows).
PAIRWISE = "pairwise"
#: What ``ask`` returns to skip a prompt (nothing is written; the next session asks again) or to end the session.
SKIP = "skip"
QUIT = "quit"
#: What ``ask`` returns in pairwise mode when neither answer is better, or both are bad (the row's ``preference``).
TIE = "tie"
BOTH_BAD = "both_bad"


@dataclass(frozen=True)
class Edited:
    """What ``ask`` returns for an answer the person wrote or corrected: appended to ``sft_out`` as
    ``{"prompt", "completion"}``.

    Attributes:
        completion: the written answer, as the person typed it (str).
    """

    completion: str


__all__ = ["BOTH_BAD", "PAIRWISE", "QUIT", "SKIP", "THUMBS", "TIE", "Edited"]
