"""The ``finetune-sdk`` model backend of lm-evaluation-harness: a loaded result (or base) scored through lm-eval's
own Hugging Face backend (``HFLM``), prompts wrapped in the chat format the result was trained with, few-shot
examples as earlier turns of it.

Importing this module registers the backend with lm-eval (``lm_eval.api.registry.register_model``). lm-eval 0.4.13
reads no entry points for model backends, so the installed SDK carries a startup hook
(:mod:`finetune_sdk.evaluation.lm_eval_hook`, a ``.pth`` file in site-packages) that registers it lazily whenever lm-eval
loads its registry: the stock command takes it by name::

    lm_eval run --model finetune-sdk --model_args ref=bot@2 --tasks quillfeather_qa \\
        --include_path examples/tasks --apply_chat_template

``finetune-lm-eval`` (this module's :func:`main`, also ``python -m finetune_sdk.evaluation.lm_eval_backend``) is the same command
line with this module imported first, for interpreters that skip ``.pth`` files (``python -S``).

Model arguments: ``ref`` (a result folder, ``name@N``, ``hf://...`` or a base model), ``base`` (``true``: score
the result's base model instead), ``chat`` (``true``/``false``; default: when the result has a formatter),
``check`` (``false`` skips the adapter-applied probe), ``trust_remote_code``.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from finetune_sdk.errors import ConfigError
from finetune_sdk.evaluation.quiet import quiet_lm_eval



def _flag(value: Any, default: bool | None, name: str = "") -> bool | None:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"model argument {name + '=' if name else ''}{value!r} is not true or false; give "
                      f"{name or 'it'}=true or {name or 'it'}=false")


@functools.lru_cache(maxsize=1)
def _hflm_arguments() -> frozenset[str]:
    """The named arguments of lm-eval's ``HFLM.__init__`` (its ``**kwargs`` left out)."""
    import inspect

    parameters = inspect.signature(HFLM.__init__).parameters.values()
    return frozenset(p.name for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD) - {"self"}


@register_model("finetune-sdk")
class FinetuneSDKLM(HFLM):
    """lm-eval's ``HFLM`` over a model opened by :func:`finetune_sdk.load` (4-bit after QLoRA, its dtype, its
    adapter applied and checked), with :meth:`apply_chat_template` rendering prompts in the result's formatter.

    Example:
        >>> lm = FinetuneSDKLM(ref="bot@2")  # doctest: +SKIP
        >>> lm_eval.simple_evaluate(model=lm, tasks=["quillfeather_choice"])  # doctest: +SKIP
    """

    def __init__(self, ref: str | None = None, *, loaded: Any = None, base: Any = False, chat: Any = None,
                 check: Any = True, trust_remote_code: Any = False, batch_size: int | str | None = 1,
                 max_batch_size: int | None = 64, **kwargs: Any) -> None:
        chat = _flag(chat, None, "chat")  # every model argument checked before the model loads
        unknown = sorted(set(kwargs) - _hflm_arguments())
        if unknown:  # HFLM's **kwargs would swallow a misspelt one (bse=true scoring the result, not its base)
            raise ConfigError(f"unknown model argument {unknown[0]!r} of the finetune-sdk backend; give ref, base, "
                              "chat, check, trust_remote_code (or one of lm-eval's HFLM arguments)")
        if loaded is None:
            if not ref:
                raise ConfigError("the finetune-sdk backend needs a model: --model_args ref=NAME@VERSION (or a "
                                  "result folder or base model)")
            flags = {name: bool(_flag(value, default, name)) for name, value, default in (
                ("base", base, False), ("check", check, True), ("trust_remote_code", trust_remote_code, False))}
            loaded = open_for_lm_eval(str(ref), **flags)
        self.loaded = loaded
        self.formatter = loaded.formatter
        self.chat = bool(self.formatter is not None if chat is None else chat)
        kwargs.pop("device", None)  # the model is already placed by finetune_sdk.load
        kwargs.pop("pretrained", None)
        with quiet_lm_eval():
            super().__init__(pretrained=loaded.model, tokenizer=loaded.tokenizer, backend="causal",
                             batch_size=batch_size if batch_size is not None else 1, max_batch_size=max_batch_size,
                             **kwargs)

    @classmethod
    def from_loaded(cls, loaded: Any, *, batch_size: int | str = "auto", chat: bool | None = None) -> FinetuneSDKLM:
        """The backend over an already loaded ``LoadedModel`` (what :func:`finetune_sdk.benchmark` uses)."""
        return cls(loaded=loaded, batch_size=batch_size, chat=chat)

    def _detect_batch_size(self, requests: Any = None, pos: int = 0) -> int:
        """``batch_size="auto"``: on the GPU lm-eval's own search (the largest batch whose forward passes don't
        run out of memory); on the CPU :func:`cpu_batch_size`, from the free memory. lm-eval's search can't work
        there: an allocation too large for the machine is not an exception but the kernel's OOM killer (seen on
        SmolLM2-135M: its generation probe is 64 sequences of the full 8,192-token context, ~100 GB of logits)."""
        if getattr(self.device, "type", str(self.device)) != "cpu":
            return super()._detect_batch_size(requests, pos)
        if requests:
            _, context, continuation = requests[pos]
            length, generation = len((context + continuation)[-(self.max_length + 1):][:-1]), False
        else:  # generate_until asks without requests: the model's whole context
            length, generation = self.max_length, True
        from finetune_sdk.advice.machine import available_memory

        return cpu_batch_size(self.model.config, length, available_memory("cpu"), generation=generation,
                              largest=self.max_batch_size)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or "finetune-sdk").replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation in the chat format the result was trained in (its formatter): lm-eval's few-shot
        examples (user/assistant turns, as ``fewshot_as_multiturn`` gives them) become earlier turns of one
        conversation, the last user message is the question, wrapped up to where the answer starts
        (:func:`finetune_sdk.formatter.few_shot_segments`); a system message (a task's ``description``) goes ahead
        of the first question. With no formatter: the tokenizer's own chat template (lm-eval's ``HFLM``)."""
        if self.formatter is None:
            return super().apply_chat_template(chat_history, add_generation_prompt)
        prefill = ""
        if chat_history and chat_history[-1]["role"] == "assistant":  # a task's gen_prefix starts the answer
            prefill, chat_history = chat_history[-1]["content"], chat_history[:-1]
        examples, question = conversation_turns(chat_history)
        ids = self.loaded.prompt_ids(question, examples=examples)
        return self.tokenizer.decode(ids, skip_special_tokens=False) + prefill


def cpu_batch_size(config: Any, length: int, available: int, *, generation: bool, largest: int = 64) -> int:
    """The batch size ``batch_size="auto"`` takes on the CPU: as many sequences of ``length`` tokens as fit in half
    of ``available`` bytes, at most ``largest``, at least 1.

    Per sequence, scoring (log-likelihood) holds fp32 logits and their log-softmax over the vocabulary for every
    position, plus transient activations: ``length * (vocab * 4 * 3 + hidden * 4 * 16)`` bytes; generation keeps
    only the last position's logits, but a key/value cache: ``length * hidden * layers * 2 * 4`` plus the same
    activations. Example: SmolLM2-135M (vocab 49,152, hidden 576, 30 layers) scoring 60-token documents with 15 GiB
    free gets 64; generating with its 8,192-token context gets 5.

    >>> from types import SimpleNamespace
    >>> smollm2 = SimpleNamespace(vocab_size=49152, hidden_size=576, num_hidden_layers=30)
    >>> cpu_batch_size(smollm2, 60, 15 * 2**30, generation=False), cpu_batch_size(smollm2, 8192, 15 * 2**30, generation=True)
    (64, 5)
    """
    vocab = int(getattr(config, "vocab_size", 32000) or 32000)
    hidden = int(getattr(config, "hidden_size", 4096) or 4096)
    layers = int(getattr(config, "num_hidden_layers", 32) or 32)
    activations = hidden * 4 * 16
    per_token = (hidden * layers * 2 * 4 + activations) if generation else (vocab * 4 * 3 + activations)
    return max(1, min(int(largest or 64), int(available // 2 // max(1, length * per_token))))


def conversation_turns(chat_history: list[dict[str, str]]) -> tuple[list[tuple[str, str]], str]:
    """lm-eval's chat history as ``(examples, question)``: each user message answered by the next assistant
    message is an example, the user text after the last answer the question; system text (and consecutive user
    messages) is joined ahead of the question it precedes with a blank line.

    >>> conversation_turns([{"role": "system", "content": "Sums."}, {"role": "user", "content": "1+1?"},
    ...                     {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2?"}])
    ([('Sums.\\n\\n1+1?', '2')], '2+2?')
    """
    examples, pending = [], []
    for message in chat_history:
        if message["role"] == "assistant":
            examples.append(("\n\n".join(pending).strip(), message["content"]))
            pending = []
        else:
            pending.append(message["content"])
    return examples, "\n\n".join(pending).strip()


def open_for_lm_eval(ref: str, *, base: bool, check: bool, trust_remote_code: bool) -> Any:
    """The ``LoadedModel`` the command-line route scores: the result (checked against its base) or its base."""
    from finetune_sdk.evaluation.opening import open_models
    from finetune_sdk.models.loading import is_result, load_base
    from finetune_sdk.log import known_dependency_messages

    with known_dependency_messages():
        if base and is_result(ref):
            return load_base(ref, trust_remote_code=trust_remote_code)
        tuned, _, _ = open_models(ref, with_base=False, check=check, trust_remote_code=trust_remote_code)
        return tuned


def main(argv: list[str] | None = None) -> None:
    """``finetune-lm-eval``: lm-eval's command line with the ``finetune-sdk`` backend registered. An SDK error (an
    unknown ``ref``, the fine-tuned weights not applied) is one line on stderr and exit status 2, as in ``finetune``.
    """
    from lm_eval.__main__ import cli_evaluate

    from finetune_sdk.errors import FinetuneError

    saved = sys.argv
    sys.argv = ["finetune-lm-eval", *(argv if argv is not None else sys.argv[1:])]
    try:
        cli_evaluate()
    except FinetuneError as error:
        print(f"Error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
