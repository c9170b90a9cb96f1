"""Preference pairs as training examples: (prompt, chosen, rejected) rows encoded as two sequences each, the pairs a
rater ranked neither way left out. Shared by the pair objectives (DPO, ORPO, SimPO, reward modeling) and by
evaluating a reward model on pairs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TYPE_CHECKING

from finetune_sdk.data.encoding import IGNORE_INDEX, Encoded, encode_segments
from finetune_sdk.data.rows import Rows

if TYPE_CHECKING:
    from finetune_sdk.formatter import Formatter

#: The ``preference`` values of a pair a rater ranked neither way (``finetune feedback`` records them): kept in the
#: ratings file, never trained on.
UNRANKED = ("tie", "both_bad")


def ranked_pairs(rows: Rows) -> Rows:
    """``rows`` without the pairs a rater ranked neither way (``"preference": "tie"`` or ``"both_bad"``, as
    ``finetune feedback`` records them): they are counted in an info line, never trained on.

    Raises:
        DataError: every row is such a pair.

    Example:
        >>> rows = Rows([{"prompt": "a", "chosen": "x", "rejected": "y"},
        ...              {"prompt": "b", "chosen": "x", "rejected": "y", "preference": "tie"}], ["r1", "r2"], "pairs")
        >>> ranked_pairs(rows).where
        ['r1']
    """
    import logging

    keep = [i for i, row in enumerate(rows.rows) if row.get("preference") not in UNRANKED]
    if len(keep) == len(rows.rows):
        return rows
    skipped = len(rows.rows) - len(keep)
    if not keep:
        from finetune_sdk.errors import DataError

        raise DataError(f"{rows.source}: all {skipped} pairs are ties or both bad (column preference); nothing to "
                        "learn a preference from: rate pairs with a better answer")
    logging.getLogger("finetune_sdk").info("%s: %d of %d pairs are ties or both bad (column preference): skipped, "
                                           "not trained on", rows.source, skipped, len(rows.rows))
    return Rows([rows.rows[i] for i in keep], [rows.where[i] for i in keep], rows.source)


def encode_preference(rows: Rows, formatter: Formatter, tokenizer: Any, options: Mapping[str, Any]) -> Encoded:
    """Encode (prompt, chosen, rejected) rows; a pair where either answer is cut off entirely is dropped, a tie or
    both-bad pair (:func:`ranked_pairs`) skipped."""
    rows = ranked_pairs(rows)
    out = Encoded()
    for row, where in zip(rows.rows, rows.where):
        formatter.validate(row, where)
        chosen_segments, rejected_segments = formatter.pair_segments(row, tokenizer, options)
        chosen = encode_segments(chosen_segments, tokenizer, options["max_length"])
        rejected = encode_segments(rejected_segments, tokenizer, options["max_length"])
        if all(x == IGNORE_INDEX for x in chosen["labels"]) or all(x == IGNORE_INDEX for x in rejected["labels"]):
            out.dropped += 1
            continue
        out.tokens += len(chosen["input_ids"]) + len(rejected["input_ids"])
        out.examples.append({"chosen": chosen, "rejected": rejected})
    if out.dropped * 2 > len(rows):
        from finetune_sdk.errors import DataError

        raise DataError(f"{rows.source}: {out.dropped} of {len(rows)} pairs have no answer tokens left after "
                        f"truncation to max_length={options['max_length']}; raise max_length")
    return out
