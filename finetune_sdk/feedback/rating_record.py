"""What a rating row records besides the rating: who rated, when, which model answered and how it sampled, so that
ratings from several rounds of the feedback loop can be told apart and filtered (:func:`select_ratings`).

The fields (all optional; the ``kto``, ``preference`` and chat formatters ignore them):

* ``rater``: the name given with ``--rater`` / ``rater=`` (or the ``FINETUNE_SDK_RATER`` environment variable). Nothing
  is recorded without one: a ratings file is often shared with the data, and the login name of whoever ran the
  session is personal data the SDK does not write on its own.
* ``rated_at``: when the rating was given, ISO-8601 UTC to the second (``2026-12-07T01:30:00Z``).
* ``model``: ``{"ref": what was given, "version": "name@3", "manifest_sha256": "..."}``; ``version`` for a
  registry reference (an alias such as ``@production`` resolved to the version it pointed at), ``manifest_sha256``
  (the hash of the result's ``finetune_manifest.json``, which differs for every training run) for a result folder or
  registry version; only ``ref`` for a base model. A model passed as an object records the ``model_ref`` given.
* ``sampling``: the generation settings of the answers: ``do_sample``, ``temperature``, ``max_new_tokens``, the
  settings of the model's own generation config that were on (``top_k``, ``top_p``, ``repetition_penalty``...) and
  the ``stop_token_ids`` (:func:`~finetune_sdk.feedback.session.answer_settings`), and the session ``seed`` (with the prompt
  and its occurrence it gives the answers again: :func:`~finetune_sdk.feedback.session.prompt_seed`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from finetune_sdk.errors import ConfigError
from finetune_sdk.feedback.answers import BOTH_BAD, PAIRWISE, SKIP, THUMBS, TIE, Edited

#: The environment variable naming the rater when no ``--rater`` is given.
RATER_ENV = "FINETUNE_SDK_RATER"
#: The longest rater name accepted.
MAX_RATER = 100
__all__ = ["RATER_ENV", "check_rater", "model_reference", "rated_at", "rating_row", "select_ratings", "with_record"]


def check_rater(rater: Any) -> str | None:
    """The rater name to record: ``rater``, else ``$FINETUNE_SDK_RATER``, else None (nothing recorded).

    Raises:
        ConfigError: a name that is not text, is blank, longer than :data:`MAX_RATER` characters or holds control
            characters.

    Example:
        >>> check_rater("ana")
        'ana'
    """
    if rater is None:
        rater = os.environ.get(RATER_ENV) or None
        if rater is None:
            return None
    if not isinstance(rater, str) or not rater.strip() or len(rater) > MAX_RATER or \
            any(not ch.isprintable() for ch in rater):
        raise ConfigError(f"rater must be a name of 1 to {MAX_RATER} printable characters, got {rater!r}")
    return rater.strip()


def rated_at(now: datetime | None = None) -> str:
    """``now`` (default: the current time) as ISO-8601 UTC to the second, ``Z`` suffixed.

    Example:
        >>> rated_at(datetime(2026, 12, 7, 1, 30, 5, 999, tzinfo=timezone.utc))
        '2026-12-07T01:30:05Z'
    """
    moment = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return moment.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def model_reference(model: Any, model_ref: str | None = None) -> dict[str, str]:
    """The ``model`` field of a rating row for ``model`` (a path, registry reference or base model id; or a loaded
    model object, named by ``model_ref``). Reads only the manifest; never loads weights and never creates a
    registry.

    Example:
        >>> model_reference("HuggingFaceTB/SmolLM2-135M-Instruct")
        {'ref': 'HuggingFaceTB/SmolLM2-135M-Instruct'}
    """
    from finetune_sdk.training.manifest import MANIFEST_NAME

    if not isinstance(model, (str, os.PathLike)):
        return {"ref": model_ref} if model_ref else {"ref": f"<{type(model).__name__} object>"}
    text = os.fspath(model)
    record = {"ref": model_ref or text}
    folder: Path | None = Path(text) if (Path(text) / MANIFEST_NAME).is_file() else None
    if folder is None:
        version = _registry_version(text)
        if version is not None:
            record["version"], folder = version
    if folder is not None and (folder / MANIFEST_NAME).is_file():
        record["manifest_sha256"] = hashlib.sha256((folder / MANIFEST_NAME).read_bytes()).hexdigest()
    return record


def _registry_version(ref: str) -> tuple[str, Path] | None:
    """``("name@3", checkout folder)`` of a reference the local registry knows (an alias resolved to the version it
    points at now), else None. A registry that doesn't exist is not created."""
    from finetune_sdk.registry.local import default_home

    if not (default_home() / "index.db").is_file():
        return None
    try:
        from finetune_sdk.registry import Registry

        registry = Registry()
        version = registry.resolve(ref)
        return version.ref, registry.path(version.ref)
    except Exception:  # not a registry reference after all (a base model id): the ref alone is recorded  # noqa: BLE001
        return None


def with_record(row: Mapping[str, Any], record: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` followed by the record fields in the order every ratings row has them: ``rater`` (when ``record``
    names one), ``rated_at`` (now), then ``model`` and ``sampling`` (``record``: what
    :func:`finetune_sdk.feedback.session.record_fields` returns).

    Example:
        >>> list(with_record({"prompt": "Hi", "completion": "Hello", "label": True}, {"model": {"ref": "m"}}))
        ['prompt', 'completion', 'label', 'rated_at', 'model']
    """
    return {**row, **({"rater": record["rater"]} if "rater" in record else {}), "rated_at": rated_at(),
            **{k: v for k, v in record.items() if k != "rater"}}


def rating_row(mode: str, prompt: str, answers: list[str], rating: Any,
               record: Mapping[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """The row a rating gives, as ``finetune feedback`` and the studio write it: ``("rating", row)`` for the ratings
    file, ``("edit", row)`` for the edited-answers file, ``("skip", None)``.

    Args:
        mode: ``"thumbs"`` (``answers`` holds one answer) or ``"pairwise"`` (two).
        rating: ``True``/``False`` (thumbs), ``0``/``1`` (the better answer's index), ``"tie"``, ``"both_bad"``
            (pairwise), an :class:`~finetune_sdk.feedback.answers.Edited`, ``"skip"`` or ``None``.
        record: the fields every row carries (:func:`finetune_sdk.feedback.session.record_fields`).

    Raises:
        ConfigError: a rating this mode has no row for, or an empty edited answer.

    Example:
        >>> rating_row("pairwise", "Hi", ["Hello", "Yo"], 1, {})[1]["chosen"]
        'Yo'
    """

    if rating is None or rating == SKIP:
        return "skip", None
    if isinstance(rating, Edited):
        if not isinstance(rating.completion, str) or not rating.completion.strip():
            raise ConfigError(f"ask returned an empty edited answer for prompt {prompt[:60]!r}")
        return "edit", with_record({"prompt": prompt, "completion": rating.completion}, record)
    if mode == THUMBS and isinstance(rating, bool):
        return "rating", with_record({"prompt": prompt, "completion": answers[0], "label": rating}, record)
    if mode == PAIRWISE and not isinstance(rating, bool) and rating in (0, 1):
        return "rating", with_record({"prompt": prompt, "chosen": answers[rating], "rejected": answers[1 - rating]},
                                     record)
    if mode == PAIRWISE and rating in (TIE, BOTH_BAD):
        return "rating", with_record({"prompt": prompt, "chosen": answers[0], "rejected": answers[1],
                                      "preference": rating}, record)
    expected = "True or False" if mode == THUMBS else "0 or 1 (the better answer's index), 'tie', 'both_bad'"
    raise ConfigError(f"ask returned {rating!r} for prompt {prompt[:60]!r}; in {mode} mode return "
                      f"{expected}, Edited(text), 'skip' or 'quit'")


def select_ratings(path: str | os.PathLike[str], *, model: str | None = None, rater: str | None = None,
                   since: str | None = None, ranked_only: bool = False) -> list[dict[str, Any]]:
    """The rows of a ratings file that match every criterion given, as a list ``Trainer.fit`` takes.

    Args:
        path: a ratings file written by ``finetune feedback`` / :func:`~finetune_sdk.collect_feedback`.
        model: keep rows whose ``model`` field has this ``ref``, ``version`` or ``manifest_sha256`` (one round of
            the loop: the model version that answered).
        rater: keep rows of this rater.
        since: keep rows rated at or after this ISO-8601 UTC time (``2026-12-07`` or ``2026-12-07T01:00:00Z``).
        ranked_only: drop tie / both-bad rows (``preference`` set): the preference formatter skips them anyway.

    Raises:
        ConfigError: a missing file or a line that is not a JSON row (naming its line).

    Example:
        >>> rows = select_ratings("pairs.jsonl", model="helpful-bot@3")  # doctest: +SKIP
        >>> Trainer("base", technique="lora", formatter="preference").fit(rows)  # doctest: +SKIP
    """
    kept = []
    for row in _rows(Path(path)):
        record = row.get("model") if isinstance(row.get("model"), Mapping) else {}
        if model is not None and model not in (record.get("ref"), record.get("version"),
                                               record.get("manifest_sha256")):
            continue
        if rater is not None and row.get("rater") != rater:
            continue
        if since is not None and not (isinstance(row.get("rated_at"), str) and
                                      _utc(row["rated_at"], "rated_at") >= _utc(since, "since")):
            continue
        if ranked_only and "preference" in row:
            continue
        kept.append(row)
    return kept


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    if not path.is_file():
        raise ConfigError(f"ratings file {path} does not exist")
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"{path} line {number} is not a JSON row") from None
        if isinstance(row, dict):
            yield row


def _utc(text: str, what: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not an ISO-8601 time (e.g. 2026-12-07T01:30:00Z)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
