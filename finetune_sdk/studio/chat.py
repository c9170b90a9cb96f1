"""The studio's chat: one prompt answered by the base model and registry versions / run results side by side.

Every model is opened as ``finetune feedback`` opens it (:func:`finetune_sdk.models.loading.open_model`: a result or
registry reference through ``finetune_sdk.load``, with the formatter it was trained with; a base model with the
formatter chosen), kept loaded for the next prompt, and answers through
:meth:`~finetune_sdk.models.inference.LoadedModel.generate`. All models answer with the same sampling settings
(:func:`finetune_sdk.feedback.session.answer_options`), each with the torch generator seeded by
:func:`finetune_sdk.feedback.session.prompt_seed` as a rating session seeds it: the answer a model gives in the chat is the
one ``finetune feedback --seed S --temperature T`` shows for the same prompt (first listing, thumbs mode), so a
thumbs rating given here is the row the terminal would write.

Generation runs on one worker thread (:class:`ChatWorker`): torch uses the cores for one model at a time, and the
web server's event loop never waits for it. Tokens reach the page as they are decoded, through a
``transformers.TextIteratorStreamer`` handed to ``generate``; the finished answer (what is rated) is the text
``generate`` returns. Each event carries the text as the model wrote it (``text``/``answer``: what a rating
records) and as the page shows it (``shown``: control characters, escape sequences and bidi overrides written as
visible escapes by :func:`finetune_sdk.feedback.screen_text.escape_controls`); the page sets it with ``textContent``, so
HTML or script in an answer is text.

Example:
    >>> worker = ChatWorker()  # doctest: +SKIP
    >>> for event in worker.answer(["models/tiny", "support@2"], "Hi", Settings()):  # doctest: +SKIP
    ...     print(event)
"""

from __future__ import annotations

import queue
import secrets
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from finetune_sdk.errors import ConfigError, FinetuneError
from finetune_sdk.feedback.screen_text import escape_controls

#: The most answers kept for rating (oldest forgotten first).
KEPT_ANSWERS = 2000
#: The most models kept loaded (the least recently used is let go first).
KEPT_MODELS = 4


@dataclass(frozen=True)
class Settings:
    """The sampling settings every model of a chat answers with (``finetune feedback``'s options and defaults)."""

    max_new_tokens: int = 128
    temperature: float = 0.8
    seed: int = 0

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Settings:
        """The settings a request names (missing: the defaults), checked as ``finetune feedback`` checks them."""
        from finetune_sdk.feedback.session import check_feedback_options

        given = body.get("settings") or {}
        if not isinstance(given, dict):
            raise ConfigError("'settings' must be a JSON object: max_new_tokens, temperature, seed")
        unknown = sorted(set(given) - set(asdict(cls())))
        if unknown:
            raise ConfigError(f"unknown sampling setting {unknown[0]!r}; the chat's settings are max_new_tokens, "
                              "temperature and seed (the others shown are the model's own)")
        settings = cls(**{**asdict(cls()), **{k: given[k] for k in asdict(cls()) if given.get(k) is not None}})
        check_feedback_options("thumbs", settings.max_new_tokens, settings.temperature, settings.seed)
        return settings


@dataclass
class Answer:
    """An answer the page may rate: who gave it, to what, with which settings, and the row fields it records."""

    id: str
    model: str
    prompt: str
    text: str
    record: dict[str, Any]


class ChatWorker:
    """Loads models once and generates on one worker thread; remembers each finished answer by id for rating."""

    def __init__(self, trust_remote_code: bool = False) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="studio-generate")
        self.models: dict[tuple[str, str | None], Any] = {}
        self.answers: dict[str, Answer] = {}
        self.lock = threading.Lock()
        self.trust_remote_code = trust_remote_code

    def model(self, ref: str, formatter: str | None = None) -> Any:
        """The loaded model ``ref`` (loaded on first use, on the worker thread only)."""
        key = (ref, formatter)
        if key not in self.models:
            from finetune_sdk.feedback.session import open_answering_model

            while len(self.models) >= KEPT_MODELS:
                self.models.pop(next(iter(self.models)))
            self.models[key] = open_answering_model(ref, formatter, self.trust_remote_code)
        self.models[key] = self.models.pop(key)  # the most recently used last
        return self.models[key]

    def run(self, function: Any, *args: Any) -> Any:
        """``function(*args)`` on the worker thread; returns its future."""
        return self.pool.submit(function, *args)

    def answer(self, refs: list[str], prompt: str, settings: Settings, *, formatter: str | None = None,
               rater: str | None = None) -> Iterator[dict[str, Any]]:
        """Events for the page, from the worker thread as they happen: ``{"event": "start", "column", "model",
        "sampling"}``, ``{"event": "token", "column", "text"}``..., ``{"event": "done", "column", "answer", "id"}``
        per model in turn, or ``{"event": "error", "column", "error"}`` (one line); ``{"event": "end"}`` last."""
        from finetune_sdk.feedback.rating_record import check_rater

        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError("type a prompt first")
        if not refs:
            raise ConfigError("pick at least one model to answer")
        rater = check_rater(rater)
        events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.run(self._answer_all, refs, prompt, settings, formatter, rater, events)
        while (event := events.get()) is not None:
            yield event

    def _answer_all(self, refs: list[str], prompt: str, settings: Settings, formatter: str | None,
                    rater: str | None, events: queue.Queue) -> None:
        try:
            for column, ref in enumerate(refs):
                try:
                    self._answer_one(column, ref, prompt, settings, formatter, rater, events)
                except FinetuneError as exc:
                    events.put({"event": "error", "column": column, "model": ref, "error": str(exc)})
                except Exception as exc:  # noqa: BLE001  (a model that fails must not end the others' answers)
                    events.put({"event": "error", "column": column, "model": ref,
                                "error": f"{type(exc).__name__}: {exc}".splitlines()[0]})
        finally:
            events.put({"event": "end"})
            events.put(None)

    def _answer_one(self, column: int, ref: str, prompt: str, settings: Settings, formatter: str | None,
                    rater: str | None, events: queue.Queue) -> None:
        import torch
        from transformers import TextIteratorStreamer

        from finetune_sdk.feedback.session import answer_options, answer_settings, cuda_device_ids, prompt_seed, record_fields

        model = self.model(ref, formatter if not _is_result(ref) else None)
        options = answer_options(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature)
        record = record_fields(ref, None, rater, settings.max_new_tokens, settings.temperature, settings.seed,
                               answer_settings(model, max_new_tokens=settings.max_new_tokens,
                                               temperature=settings.temperature))
        events.put({"event": "start", "column": column, "model": ref, "sampling": record["sampling"],
                    "formatter": getattr(model.formatter, "name", None)})
        streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, Any] = {}

        def generate() -> None:
            try:
                with torch.random.fork_rng(devices=cuda_device_ids(torch)):
                    torch.manual_seed(prompt_seed(settings.seed, prompt, 0))
                    result["text"] = model.generate([prompt], streamer=streamer, **options)[0]
            except BaseException as exc:  # noqa: BLE001  (handed to the worker, which reports it)
                result["error"] = exc
                streamer.end()

        thread = threading.Thread(target=generate, name="studio-generate-stream", daemon=True)
        thread.start()
        for piece in streamer:
            if piece:
                events.put({"event": "token", "column": column, "text": piece, "shown": escape_controls(piece)})
        thread.join()
        if "error" in result:
            raise result["error"]
        answer = self.remember(ref, prompt, result["text"], record)
        events.put({"event": "done", "column": column, "model": ref, "answer": answer.text,
                    "shown": escape_controls(answer.text), "id": answer.id})

    def remember(self, ref: str, prompt: str, text: str, record: dict[str, Any]) -> Answer:
        """Keep an answer for rating; returns it with its new id."""
        answer = Answer(secrets.token_hex(8), ref, prompt, text, record)
        with self.lock:
            self.answers[answer.id] = answer
            while len(self.answers) > KEPT_ANSWERS:
                self.answers.pop(next(iter(self.answers)))
        return answer

    def find(self, answer_id: Any) -> Answer:
        """The answer with id ``answer_id``; ConfigError when unknown (the server restarted: ask again)."""
        with self.lock:
            found = self.answers.get(str(answer_id))
        if found is None:
            raise ConfigError("that answer is no longer known to the studio (it restarted): ask the prompt again")
        return found

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _is_result(ref: str) -> bool:
    from finetune_sdk.models.loading import is_result

    return is_result(ref)
