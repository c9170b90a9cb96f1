"""Collecting human feedback: the model answers each prompt, a person rates the answer, and each rating is appended
to a ratings file the formatters read as it is (``finetune feedback`` in a terminal, :func:`collect_feedback` in a
notebook or a program).

Modes (the rows are those of :mod:`finetune_sdk.feedback.ratings_file`):

* ``thumbs``: one sampled answer, thumbs up or down -> ``{"prompt", "completion", "label"}`` rows for KTO
  (Ethayarajh et al., 2024; TRL's unpaired preference format), ``formatter="kto"``.
* ``pairwise``: two sampled answers, the better one -> ``{"prompt", "chosen", "rejected"}`` rows for DPO or a
  reward model, ``formatter="preference"``. Neither better (a tie) or both bad -> the same row with
  ``"preference": "tie"`` or ``"both_bad"`` (``chosen``/``rejected`` = answer 1/answer 2): recorded, so the prompt
  counts as rated, and skipped by the preference formatter, never trained on.
* In either mode, with ``sft_out``: an answer the person wrote or corrected -> ``{"prompt", "completion"}`` rows in
  that separate file, for supervised fine-tuning with a chat formatter (``chatml``, ``chat-template``).

Every row also records ``rated_at``, the ``model`` that answered and its ``sampling`` settings, and ``rater`` when one
is named (:mod:`finetune_sdk.feedback.rating_record`); the formatters ignore these fields.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

from finetune_sdk.errors import ConfigError
from finetune_sdk.feedback.answers import PAIRWISE, QUIT, THUMBS, Edited
from finetune_sdk.feedback.ratings_file import KTO_ROWS, PREFERENCE_ROWS, SFT_ROWS, RatingsAppender, RowShape

logger = logging.getLogger("finetune_sdk")

#: Mode -> the rows it writes to ``out``.
MODES: dict[str, RowShape] = {THUMBS: KTO_ROWS, PAIRWISE: PREFERENCE_ROWS}
#: Sampling tries for two different answers in pairwise mode before the prompt is skipped.
PAIR_TRIES = 3


@dataclass(frozen=True)
class FeedbackSummary:
    """What a session did. ``rated``: rows appended to ``out``; ``edited``: rows appended to ``sft_out``;
    ``skipped``: prompts skipped (asked again next time); ``already_rated``: prompts passed over because a row for
    them was already in ``out``/``sft_out``; ``remaining``: prompts not reached (the person quit);
    ``torn_bytes_cut``: bytes of an unfinished last row an earlier, interrupted session left and this one cut;
    ``out_rows``: the rows ``out`` holds now, from every session; ``unranked``: of the ``rated`` rows, the tie and
    both-bad ones (pairwise mode; recorded, not trained on)."""

    out: Path
    sft_out: Path | None
    mode: str
    rated: int
    edited: int
    skipped: int
    already_rated: int
    remaining: int
    torn_bytes_cut: int
    out_rows: int
    unranked: int = 0


Ask = Callable[[str, list[str]], Any]


def collect_feedback(model: Any, prompts: str | PathLike[str] | Sequence[str], out: str | PathLike[str], *,
                     mode: str = THUMBS, ask: Ask | None = None, sft_out: str | PathLike[str] | None = None,
                     max_new_tokens: int = 128, temperature: float = 0.8, seed: int = 0, formatter: str | None = None,
                     trust_remote_code: bool = False, rater: str | None = None,
                     model_ref: str | None = None) -> FeedbackSummary:
    """Show ``model``'s sampled answer(s) to each prompt, ask for a rating, and append it to ``out`` at once.

    Args:
        model: a loaded model (``finetune_sdk.load(...)``, ``Trainer.current_model()``), a result folder or
            registry reference (loaded with ``finetune_sdk.load``), or a base model path/id.
        prompts: a list of prompts, or the path of a prompts file: one prompt per line (blank lines ignored), or
            a ``.jsonl`` file whose rows have a ``prompt`` column.
        out: the ratings file (JSON Lines), created when missing. An existing one must hold rows of this mode;
            anything else is refused and left as it is.
        mode: ``"thumbs"`` (one answer, up/down: KTO rows) or ``"pairwise"`` (two answers, the better one:
            preference rows).
        ask: ``ask(prompt, answers) -> rating``, called once per prompt with the prompt and its sampled answers
            (one in thumbs mode, two in pairwise mode). Returns ``True``/``False`` (thumbs up/down) or ``0``/``1``
            (the index of the better answer in pairwise mode), ``"tie"`` or ``"both_bad"`` (pairwise mode: neither
            answer better; recorded, never trained on), :class:`Edited` (a written answer, needs
            ``sft_out``), ``"skip"`` or ``None`` (no row), ``"quit"`` (end the session). Default: a terminal
            prompt (:class:`finetune_sdk.feedback.rating_prompt.TerminalRater`), which works in Jupyter too. An ``ask`` with a
            ``note(text)`` method is also told the session's progress.
        sft_out: a separate file for edited answers (``{"prompt", "completion"}`` rows); never the same as ``out``.
        max_new_tokens: the longest answer, in tokens.
        temperature: sampling temperature; ``0`` is greedy (thumbs mode only: pairwise needs two answers).
        seed: each prompt's answers are sampled with a seed made from ``seed``, the prompt and its occurrence, so
            the same prompt shows the same answers in every session; change it for new answers.
        formatter: override the formatter recorded with a result (it wraps the prompts as in training); on a loaded
            model this sets its ``formatter``.
        trust_remote_code: let the model repository's own Python code run (only when ``model`` is a path or ref).
        rater: the name recorded as each row's ``rater`` (default ``$FINETUNE_SDK_RATER``; none: no ``rater`` field).
        model_ref: the name recorded as the ``model`` field's ``ref`` (default: ``model`` when it is a path or ref;
            for a model object without it, ``"<LoadedModel object>"``: give it to tell rounds apart).

    Returns:
        A :class:`FeedbackSummary`.

    Raises:
        ConfigError: a bad option or rater name, no prompts, ``out`` in a folder that doesn't exist, ``out`` holding
            rows that aren't this mode's, ``sft_out`` equal to ``out``, or ``ask`` returning something else than the
            above. Checked before the model loads.

    Each row is appended as one line and fsynced the moment ``ask`` returns: a crash loses at most the rating being
    given. A prompt is done when ``out`` or ``sft_out`` holds a row for it, so a second session on the same files
    asks only the rest (a prompt listed *n* times is asked until it has *n* rows).

    Example (a tiny untrained model, and an ``ask`` that likes short answers):
        >>> import json, pathlib, tempfile
        >>> from finetune_sdk.testing.tiny import save_tiny_model
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> model = save_tiny_model(folder / "model")
        >>> summary = collect_feedback(model, ["Is the sky blue?", "Name a colour."], folder / "ratings.jsonl",
        ...                            formatter="chatml", max_new_tokens=4, ask=lambda prompt, answers:
        ...                            len(answers[0]) < 12)
        >>> summary.rated, summary.out_rows, list(json.loads((folder / "ratings.jsonl").read_text().splitlines()[0]))
        (2, 2, ['prompt', 'completion', 'label', 'rated_at', 'model', 'sampling'])
    """
    from finetune_sdk.feedback.rating_record import check_rater

    shape = check_feedback_options(mode, max_new_tokens, temperature, seed)
    rater = check_rater(rater)
    prompt_list = read_prompts(prompts)
    out_path, sft_path = _check_paths(out, sft_out)
    with RatingsAppender(out_path, shape, "output file") as ratings, _maybe_sft(sft_path) as edits:
        session = _Session(prompt_list, ratings, edits, ask, mode)
        pending = session.pending()
        loaded = open_answering_model(model, formatter, trust_remote_code) if pending else None  # bad ref: one line
        session.note(f"{len(pending)} of {len(prompt_list)} prompts to rate"
                     + (f" ({len(prompt_list) - len(pending)} already rated)" if len(pending) < len(prompt_list)
                        else ""))
        if pending:
            session.record = record_fields(model, model_ref, rater, max_new_tokens, temperature, seed,
                                            answer_settings(loaded, max_new_tokens=max_new_tokens,
                                                            temperature=temperature))
            session.run(pending, lambda prompt, number, count: sample_answers(
                loaded, prompt, count, seed=prompt_seed(seed, prompt, number), max_new_tokens=max_new_tokens,
                temperature=temperature))
    return FeedbackSummary(out_path, sft_path, mode, ratings.appended, edits.appended if edits else 0,
                           session.skipped, len(prompt_list) - len(pending), session.remaining,
                           session.torn_bytes, ratings.contents.rows + ratings.appended, session.unranked)


def read_prompts(prompts: str | PathLike[str] | Sequence[str]) -> list[str]:
    """The prompts of a list, or of a file: one per line (surrounding spaces and blank lines dropped), or the
    ``prompt`` column of a ``.jsonl`` file. Raises ConfigError when there is none or the file is missing."""
    if isinstance(prompts, (str, PathLike)):
        path = Path(prompts)
        if not path.is_file():
            raise ConfigError(f"prompts file {path} does not exist" if not path.exists()
                              else f"prompts file {path} is a folder; give a text file with one prompt per line")
        if path.suffix.lower() == ".jsonl":
            from finetune_sdk.data.rows import load_rows

            rows = load_rows(path, name="prompts")
            found = []
            for row, where in zip(rows.rows, rows.where):
                if not isinstance(row.get("prompt"), str):
                    raise ConfigError(f"{where}: needs a 'prompt' column holding text")
                found.append(row["prompt"])
        else:
            from finetune_sdk.data.textfiles import read_text

            found = [line.strip() for line in read_text(path, error=ConfigError).splitlines()]
        where = str(path)
    else:
        found, where = list(prompts), "prompts"
        for i, prompt in enumerate(found):
            if not isinstance(prompt, str):
                raise ConfigError(f"prompts[{i}] must be text, got {type(prompt).__name__}")
    found = [p for p in found if p.strip()]
    if not found:
        raise ConfigError(f"{where} has no prompts; give one prompt per line (blank lines are ignored)")
    return found


def prompt_seed(seed: int, prompt: str, occurrence: int) -> int:
    """The sampling seed of ``prompt``'s ``occurrence``-th listing (0-based): the same in every session.

    >>> prompt_seed(0, "Hi", 0) == prompt_seed(0, "Hi", 0) != prompt_seed(1, "Hi", 0)
    True
    """
    digest = hashlib.sha256(f"{seed}\n{occurrence}\n{prompt}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def sample_answers(model: Any, prompt: str, count: int, *, seed: int, max_new_tokens: int,
                   temperature: float) -> list[str]:
    """``count`` answers to ``prompt`` from ``model.generate`` (one batch), sampled at ``temperature`` (greedy at 0)
    with the torch generator seeded by ``seed``; the caller's random state is put back afterwards."""
    import torch

    options = answer_options(max_new_tokens=max_new_tokens, temperature=temperature)
    with torch.random.fork_rng(devices=cuda_device_ids(torch)):
        torch.manual_seed(seed)
        answers = model.generate([prompt] * count, **options)
        tries = 1
        while count == 2 and answers[0] == answers[1] and tries < PAIR_TRIES:
            answers, tries = model.generate([prompt] * count, **options), tries + 1
    return answers


def record_fields(model: Any, model_ref: str | None, rater: str | None, max_new_tokens: int, temperature: float,
                   seed: int, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The fields every row of the session carries besides ``rated_at`` (:mod:`finetune_sdk.feedback.rating_record`);
    ``sampling`` holds the settings the answers are actually drawn with (:func:`answer_settings`)."""
    from finetune_sdk.feedback.rating_record import model_reference

    fields: dict[str, Any] = {"rater": rater} if rater is not None else {}
    fields["model"] = model_reference(model, model_ref)
    fields["sampling"] = {"do_sample": temperature > 0, "temperature": float(temperature),
                          "max_new_tokens": max_new_tokens, **(settings or {}), "seed": seed}
    return fields


def answer_options(*, max_new_tokens: int, temperature: float) -> dict[str, Any]:
    """The ``generate`` arguments a rating session samples its answers with: ``temperature`` (greedy at 0); the
    rest (``top_k``, ``top_p``, a ``repetition_penalty``) is the model's own generation config, as when chatting.

    >>> answer_options(max_new_tokens=16, temperature=0.8)
    {'do_sample': True, 'max_new_tokens': 16, 'temperature': 0.8}
    """
    options: dict[str, Any] = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens}
    if temperature > 0:
        options["temperature"] = temperature
    return options


def answer_settings(model: Any, *, max_new_tokens: int, temperature: float) -> dict[str, Any]:
    """The settings the answers of a rating session are actually drawn with (the model's generation config under
    :func:`answer_options`, the SDK's stop ids; :meth:`~finetune_sdk.models.inference.LoadedModel.generation_settings`), as
    a JSON-ready dict to record with the ratings; a model without ``generation_settings`` gives the options alone."""
    options = answer_options(max_new_tokens=max_new_tokens, temperature=temperature)
    settings = getattr(model, "generation_settings", None)
    return settings(**options) if callable(settings) else options


def cuda_device_ids(torch: Any) -> list[int]:
    """The CUDA device ids ``torch`` sees (``[]`` without CUDA), for ``torch.random.fork_rng(devices=...)``."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


class _Session:
    """One pass over the prompts: which are pending, asking, appending, counting."""

    def __init__(self, prompts: list[str], ratings: RatingsAppender, edits: RatingsAppender | None,
                 ask: Ask | None, mode: str) -> None:
        if ask is None:
            from finetune_sdk.feedback.rating_prompt import TerminalRater

            ask = TerminalRater(edits=edits is not None)
        self.prompts, self.ratings, self.edits, self.ask, self.mode = prompts, ratings, edits, ask, mode
        self.done: Counter[str] = Counter(ratings.contents.prompts)
        self.torn_bytes = ratings.contents.torn_bytes
        if edits is not None:
            self.done += edits.contents.prompts
            self.torn_bytes += edits.contents.torn_bytes
        self.skipped = self.remaining = self.unranked = 0
        self.record: dict[str, Any] = {}

    def note(self, text: str) -> None:
        (getattr(self.ask, "note", None) or logger.info)(text)

    def pending(self) -> list[tuple[str, int]]:
        """(prompt, occurrence) of every listing that has no row yet, in the file's order."""
        return pending_listings(self.prompts, self.done)

    def run(self, pending: list[tuple[str, int]], sample: Callable[[str, int, int], list[str]]) -> None:
        count = 2 if self.mode == PAIRWISE else 1
        for position, (prompt, occurrence) in enumerate(pending):
            answers = sample(prompt, occurrence, count)
            if count == 2 and answers[0] == answers[1]:
                self.note(f"skipped {prompt[:60]!r}: the model gave the same answer {PAIR_TRIES} times; raise the "
                          "temperature or rate it in thumbs mode")
                self.skipped += 1
                continue
            rating = self.ask(prompt, list(answers))
            if rating == QUIT:
                self.remaining = len(pending) - position
                return
            self._record(prompt, answers, rating)

    def _record(self, prompt: str, answers: list[str], rating: Any) -> None:
        from finetune_sdk.feedback.rating_record import rating_row

        kind, row = rating_row(self.mode, prompt, answers, rating, self.record)
        if kind == "skip":
            self.skipped += 1
        elif kind == "edit":
            if self.edits is None:
                raise ConfigError("ask returned an edited answer but no sft_out file was given for edited answers")
            self.edits.append(row)
        else:
            self.ratings.append(row)
            self.unranked += "preference" in row


def pending_listings(prompts: Sequence[str], done: Mapping[str, int]) -> list[tuple[str, int]]:
    """``(prompt, occurrence)`` of every listing of ``prompts`` that has no row yet, given ``done`` (prompt -> rows
    the ratings files hold for it), in the list's order: a prompt listed *n* times is pending until it has *n* rows.

    >>> pending_listings(["a", "b", "a"], {"a": 1})
    [('b', 0), ('a', 1)]
    """
    seen: Counter[str] = Counter()
    pending = []
    for prompt in prompts:
        if seen[prompt] >= done.get(prompt, 0):
            pending.append((prompt, seen[prompt]))
        seen[prompt] += 1
    return pending


def check_feedback_options(mode: str, max_new_tokens: Any, temperature: Any, seed: Any) -> RowShape:
    """Check a rating session's options before a model loads (ConfigError, one line); returns the rows ``mode`` writes.

    >>> check_feedback_options("thumbs", 64, 0.7, 0).formatter
    'kto'
    """
    if mode not in MODES:
        from finetune_sdk.errors import unknown_name_error

        raise unknown_name_error("feedback mode", str(mode), MODES)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a whole number of at least 1, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ConfigError(f"temperature must be a number of at least 0, got {temperature!r}")
    if mode == PAIRWISE and temperature == 0:
        raise ConfigError("pairwise mode compares two sampled answers: temperature must be above 0 (0 is greedy, "
                          "one answer)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be a whole number, got {seed!r}")
    return MODES[mode]


def _check_paths(out: Any, sft_out: Any) -> tuple[Path, Path | None]:
    from finetune_sdk.feedback.ratings_file import check_output_file

    out_path = Path(out)
    check_output_file(out_path, "output file")
    if sft_out is None:
        return out_path, None
    sft_path = Path(sft_out)
    check_output_file(sft_path, "edited-answers file")
    if sft_path.resolve() == out_path.resolve():
        raise ConfigError(f"edited answers need a file of their own: {sft_path} is also the ratings file, and a file "
                          "mixing the two trains with neither formatter")
    return out_path, sft_path


class _NoEdits:
    appended = 0

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _maybe_sft(path: Path | None) -> Any:
    return RatingsAppender(path, SFT_ROWS, "edited-answers file") if path is not None else _NoEdits()


def open_answering_model(model: Any, formatter: str | None, trust_remote_code: bool) -> Any:
    """The model that answers a rating session: a path or reference through :func:`finetune_sdk.models.loading.open_model`,
    a loaded model with ``formatter`` set if named. Raises ConfigError for a classifier or a bad reference."""
    if isinstance(model, (str, PathLike)):
        from finetune_sdk.models.loading import open_model

        model = open_model(str(model), formatter, trust_remote_code)
    elif formatter is not None:
        from finetune_sdk.plugin_manager import get_plugin_host

        model.formatter = get_plugin_host().create("formatter", formatter)
    if not hasattr(model, "generate") or getattr(model, "task", None) == "classification":
        raise ConfigError("collect_feedback needs a generative model; a classifier can't answer prompts")
    return model
