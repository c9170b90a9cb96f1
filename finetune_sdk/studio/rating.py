"""Ratings given in the studio's page, appended as ``finetune feedback`` appends them.

A rating names answers the studio gave (:class:`~finetune_sdk.studio.chat.Answer`, by id: the page never sends the
answer text back, so a row holds exactly what the model wrote). Its row is built by
:func:`finetune_sdk.feedback.rating_record.rating_row`, the function ``finetune feedback`` uses, with the record fields of
the answer (``rater``, ``rated_at``, ``model``, ``sampling``: :func:`finetune_sdk.feedback.session.record_fields`), and
appended by :class:`finetune_sdk.feedback.ratings_file.RatingsAppender`: one ``write`` and one ``fsync`` per row, under
``flock``. The studio opens the file for each rating and waits for the lock (``wait_seconds``), so two pages (or a
page and a script) rating at once take turns and never lose or interleave a row, and a server killed mid-way loses
at most the rating being written.

Kinds of rating:

* ``thumbs``: one answer, ``value`` true/false -> a KTO row (``prompt``, ``completion``, ``label``).
* ``pair``: two answers to the same prompt, ``value`` 0/1 or ``"a"``/``"b"`` (the better one), ``"tie"`` or
  ``"both_bad"`` -> a preference row; its record fields are those of the second (right-hand) answer: in the chat
  the base model is always on the left, so the row names the version being rated.
* ``edit``: one answer and ``value`` the text that should have been written -> an SFT row (``prompt``,
  ``completion``) in the edited-answers file.

Rating sessions over a prompts file (:func:`next_in_session`) do what ``finetune feedback`` does: the prompts that
have no row yet in the ratings file (or the edited-answers file), each answered with
:func:`finetune_sdk.feedback.session.sample_answers` seeded by :func:`~finetune_sdk.feedback.session.prompt_seed` (the same
answers the terminal would show).

Example:
    >>> rate(worker, confine, {"kind": "thumbs", "answers": ["3f2a..."], "value": True,  # doctest: +SKIP
    ...                         "out": "thumbs.jsonl"})
    {'file': '/work/thumbs.jsonl', 'rows': 1, 'row': {...}}
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

from finetune_sdk.errors import ConfigError
from finetune_sdk.feedback.ratings_file import KTO_ROWS, PREFERENCE_ROWS, SFT_ROWS, RatingsAppender, read_ratings

#: How long a rating waits for another writer of the same file (seconds).
LOCK_WAIT = 30.0
KINDS = {"thumbs": ("thumbs", KTO_ROWS, 1), "pair": ("pairwise", PREFERENCE_ROWS, 2), "edit": ("thumbs", SFT_ROWS, 1)}
_locks: dict[Path, threading.Lock] = {}
_locks_guard = threading.Lock()


def _file_lock(path: Path) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(path, threading.Lock())


def rate(worker: Any, confine: Any, body: dict[str, Any]) -> dict[str, Any]:
    """Append the rating ``body`` names (``kind``, ``answers``: ids, ``value``, ``out``: the file) at once.

    Returns ``{"file", "rows", "row"}``: the file, the rows it holds now and the row appended.

    Raises:
        ConfigError: an unknown kind, answers that don't fit it (unknown ids, two answers to different prompts), a
            value the kind has no row for, or a file outside the studio's folders / holding other rows.
    """
    from finetune_sdk.feedback.answers import Edited
    from finetune_sdk.feedback.rating_record import rating_row

    kind = body.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"unknown rating kind {kind!r}; use one of {', '.join(KINDS)}")
    mode, shape, count = KINDS[kind]
    ids = body.get("answers")
    if not isinstance(ids, list) or len(ids) != count:
        raise ConfigError(f"a {kind} rating names {count} answer{'s' * (count > 1)} (their ids)")
    answers = [worker.find(i) for i in ids]
    if len({a.prompt for a in answers}) > 1:
        raise ConfigError("the two answers of a pair must answer the same prompt")
    value = body.get("value")
    if kind == "edit":
        if not isinstance(value, str) or not value.strip():
            raise ConfigError("an edit needs the better answer's text (not empty) as its value")
        value = Edited(value)
    elif kind == "thumbs" and not isinstance(value, bool):
        raise ConfigError("a thumbs rating is true (up) or false (down)")
    elif kind == "pair":
        value = pair_value(value)
    _, row = rating_row(mode, answers[0].prompt, [a.text for a in answers], value, answers[-1].record)
    if row is None:
        raise ConfigError("nothing to record: give a rating")
    path = output_path(confine, body.get("out"), shape)
    with _file_lock(path), RatingsAppender(path, shape, _what(shape), wait_seconds=LOCK_WAIT) as ratings:
        ratings.append(row)
        rows = ratings.contents.rows + ratings.appended
    return {"file": str(path), "rows": rows, "row": row}


def pair_value(value: Any) -> int | str:
    """An A/B rating's value as ``rating_row`` takes it: 0 or ``"a"`` (A is better), 1 or ``"b"`` (B is better),
    ``"tie"`` or ``"both_bad"`` (``"both bad"``, ``"both-bad"``); anything else is one line (:class:`ConfigError`).

    >>> pair_value("B"), pair_value("Both bad")
    (1, 'both_bad')
    """
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return value
    if isinstance(value, str):
        word = value.strip().lower().replace(" ", "_").replace("-", "_")
        if word in ("a", "b"):
            return "ab".index(word)
        if word in ("tie", "both_bad"):
            return word
    raise ConfigError(f"a pair rating's value is 0 or 'a' (A is better), 1 or 'b' (B is better), 'tie' or "
                      f"'both_bad'; got {value!r}")


def _what(shape: Any) -> str:
    return "edited-answers file" if shape is SFT_ROWS else "output file"


def output_path(confine: Any, given: Any, shape: Any) -> Path:
    """The ratings file named on the page: under the studio's folders, in a folder that exists."""
    from finetune_sdk.feedback.ratings_file import check_output_file

    if not isinstance(given, str) or not given.strip():
        raise ConfigError(f"name the file for the {shape.name} (a .jsonl path under the studio's folder)")
    path = confine.check(given)
    check_output_file(path, _what(shape))
    return path


def counts(path: Path, shape: Any) -> Counter[str]:
    """Rows per prompt in a ratings file (empty when it doesn't exist yet)."""
    return read_ratings(path, shape).prompts if path.is_file() else Counter()


def next_in_session(worker: Any, confine: Any, body: dict[str, Any]) -> dict[str, Any]:
    """The next prompt of a ratings session over a prompts file, answered as ``finetune feedback`` answers it.

    ``body``: ``model``, ``prompts`` (a prompts file), ``mode`` (thumbs or pairwise), ``out`` (the ratings file),
    ``sft_out`` (optional edited-answers file), ``settings``, ``rater``, ``formatter``. Returns ``{"done": true,
    "total"}`` when every prompt has a row, else ``{"prompt", "occurrence", "answers": [{"id", "text"}], "pending",
    "total", "record"}``. Runs on the worker thread (the caller awaits it).
    """
    from finetune_sdk.feedback.answers import PAIRWISE
    from finetune_sdk.feedback.session import (answer_settings, check_feedback_options, pending_listings, prompt_seed,
                                               read_prompts, record_fields, sample_answers)
    from finetune_sdk.feedback.rating_record import check_rater
    from finetune_sdk.feedback.screen_text import escape_controls
    from finetune_sdk.studio.chat import Settings

    mode = body.get("mode") or "thumbs"
    settings = Settings.from_body(body)
    shape = check_feedback_options(mode, settings.max_new_tokens, settings.temperature, settings.seed)
    rater = check_rater(body.get("rater") or None)
    ref = body.get("model")
    if not isinstance(ref, str) or not ref:
        raise ConfigError("pick the model whose answers are rated")
    prompts = read_prompts(confine.check(body.get("prompts") or ""))
    done = counts(output_path(confine, body.get("out"), shape), shape)
    if body.get("sft_out"):
        done += counts(output_path(confine, body["sft_out"], SFT_ROWS), SFT_ROWS)
    pending = pending_listings(prompts, done)
    if not pending:
        return {"done": True, "total": len(prompts)}
    prompt, occurrence = pending[0]
    model = worker.model(ref, body.get("formatter") or None)
    record = record_fields(ref, None, rater, settings.max_new_tokens, settings.temperature, settings.seed,
                           answer_settings(model, max_new_tokens=settings.max_new_tokens,
                                           temperature=settings.temperature))
    count = 2 if mode == PAIRWISE else 1
    texts = sample_answers(model, prompt, count, seed=prompt_seed(settings.seed, prompt, occurrence),
                           max_new_tokens=settings.max_new_tokens, temperature=settings.temperature)
    answers = [worker.remember(ref, prompt, text, record) for text in texts]
    return {"done": False, "prompt": prompt, "occurrence": occurrence, "pending": len(pending),
            "total": len(prompts), "answers": [{"id": a.id, "text": a.text, "shown": escape_controls(a.text)} for a in answers],
            "sampling": record["sampling"], "same": count == 2 and texts[0] == texts[1]}
