"""The sampling distribution of training: the run's options alone, and the log-probabilities of exactly it.

``model.generate`` merges the model's ``generation_config.json`` into whatever it is given: every field a passed
``GenerationConfig`` leaves unset is taken from the model (transformers' ``_prepare_generation_config``), so a base
whose file carries ``repetition_penalty`` 1.05 (Qwen2.5-Instruct), a ``top_k``, ``no_repeat_ngram_size``,
``min_new_tokens`` or ``bad_words_ids`` would sample GRPO's completions from another distribution than the one its
loss scores. Sampling for training therefore runs with :func:`only_these_settings`: the model's generation config
is replaced, for the call, by a complete one built from the run's options (:meth:`SamplingSettings.generation_config`);
only its end-of-turn ids are the model's (:func:`finetune_sdk.models.stop_tokens.stop_token_ids`).

The options are TRL's ``GRPOConfig`` sampling options, by TRL's names and defaults (all off): ``temperature`` 1.0,
``top_p`` 1.0, ``top_k`` 0, ``min_p`` None, ``repetition_penalty`` 1.0. :meth:`SamplingSettings.logps` gives the
log-probabilities of the distribution the completions were drawn from: transformers' processors in generate's order
(repetition penalty over the prompt, left padding excluded, and the completion so far; then temperature, top-k,
top-p, min-p) replayed on every position of one forward pass. TRL divides the logits by the temperature and ignores
the truncation (its ratio then carries the kept mass; TRL issue 6789); here the truncation is replayed, as
NeMo RL and prime-rl do. A sampled token the replay would drop (a float tie at the top-p/top-k boundary, or a policy
or reference that no longer keeps it) keeps its logit, so log-probabilities stay finite (prime-rl's rule).

User-facing generation (chat, comparisons, rating sessions) is the other case: :func:`chat_generation_config` keeps
the model's own generation config, its authors' chat defaults, under the call's settings, the SDK's stop ids and
length winning; :func:`settings_summary` says what that config samples with, for the rows of a rating session.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

#: The sampling options of training, TRL's ``GRPOConfig`` names.
SAMPLING_OPTIONS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass(frozen=True)
class SamplingSettings:
    """How training samples completions (TRL's ``GRPOConfig`` names and defaults; the defaults change nothing).

    Attributes:
        temperature: logits are divided by it (> 0).
        top_p: nucleus sampling, the smallest set of tokens whose probability reaches it (0 < top_p <= 1; 1: off).
        top_k: only the k most likely tokens (0: off).
        min_p: only tokens with at least ``min_p`` times the top token's probability (None: off).
        repetition_penalty: CTRL's penalty on tokens of the prompt and the completion so far (1: off).

    Example:
        >>> import torch
        >>> settings = SamplingSettings(top_k=1)
        >>> settings.logps(torch.tensor([[[2.0, 1.0, 0.0]]]), torch.ones(1, 1, dtype=torch.long),
        ...                torch.ones(1, 1, dtype=torch.long), torch.tensor([[0]])).tolist()
        [[0.0]]
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> SamplingSettings:
        """The settings of a run's resolved options (missing ones: the defaults)."""
        given = {name: options[name] for name in SAMPLING_OPTIONS if options.get(name) is not None}
        return cls(**{**asdict(cls()), **given, "min_p": options.get("min_p")})

    @property
    def truncates(self) -> bool:
        """True when top-k, top-p or min-p drop tokens from the distribution."""
        return self.top_k > 0 or self.top_p < 1.0 or bool(self.min_p)

    def describe(self) -> dict[str, Any]:
        """The settings as a dict (for manifests and logs).

        >>> SamplingSettings(temperature=0.7).describe()["temperature"]
        0.7
        """
        return asdict(self)

    def generation_config(self, *, max_new_tokens: int, stop_ids: Sequence[int], pad_token_id: int | None,
                          greedy: bool = False) -> Any:
        """A complete ``transformers.GenerationConfig`` of these settings: sampling (or greedy: the mode of the
        same distribution, the repetition penalty applied) up to ``max_new_tokens`` new tokens, stopping at
        ``stop_ids``; every other processor off. Use it with :func:`only_these_settings`."""
        from transformers import GenerationConfig

        chosen: dict[str, Any] = {"repetition_penalty": float(self.repetition_penalty)}
        if not greedy:
            chosen.update(temperature=float(self.temperature), top_k=int(self.top_k), top_p=float(self.top_p),
                          min_p=self.min_p)
        return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not greedy, num_beams=1,
                                eos_token_id=list(stop_ids), pad_token_id=pad_token_id, **chosen)

    def logps(self, logits: Any, prompt_ids: Any, prompt_mask: Any, completion_ids: Any) -> Any:
        """Log-probabilities ``[N, C]`` (float32) of ``completion_ids`` (``[N, C]``) under the sampled distribution.

        Args:
            logits: ``[N, C, V]`` logits whose position ``t`` predicts ``completion_ids[:, t]``.
            prompt_ids: ``[N, P]`` left-padded prompts, as generate got them.
            prompt_mask: ``[N, P]`` their attention mask (0 on the left padding).
            completion_ids: ``[N, C]`` the sampled tokens.
        """
        import torch

        logits = logits.float()
        if self.repetition_penalty != 1.0:
            logits = penalised(logits, prompt_ids, prompt_mask, completion_ids, float(self.repetition_penalty))
        if self.temperature != 1.0:
            logits = logits / self.temperature
        targets = completion_ids.unsqueeze(-1)
        if self.truncates:
            n, c, v = logits.shape
            kept = self._truncated(logits.reshape(n * c, v)).view(n, c, v)
            logits = kept.scatter(2, targets, logits.gather(2, targets))  # the sampled token stays in the support
        return torch.gather(logits, 2, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)

    def _truncated(self, scores: Any) -> Any:
        """``[M, V]`` scores after top-k, top-p and min-p (transformers' warpers, in generate's order)."""
        from transformers import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        if self.top_k > 0:
            scores = TopKLogitsWarper(top_k=int(self.top_k))(None, scores)
        if self.top_p < 1.0:
            scores = TopPLogitsWarper(top_p=float(self.top_p))(None, scores)
        if self.min_p is not None:
            scores = MinPLogitsWarper(min_p=float(self.min_p))(None, scores)
        return scores


def penalised(logits: Any, prompt_ids: Any, prompt_mask: Any, completion_ids: Any, penalty: float) -> Any:
    """``[N, C, V]`` logits with CTRL's repetition penalty (Keskar et al., 2019) as transformers'
    ``RepetitionPenaltyLogitsProcessor`` applies it in generate: at position ``t``, a token seen in the prompt (the
    left padding excluded) or in ``completion_ids[:, :t]`` has its logit divided by ``penalty`` (multiplied when
    negative).

    >>> import torch
    >>> penalised(torch.tensor([[[2.0, -2.0, 1.0]]]), torch.tensor([[0, 1]]), torch.tensor([[1, 1]]),
    ...           torch.tensor([[2]]), 2.0).tolist()
    [[[1.0, -4.0, 1.0]]]
    """
    import torch

    n, c, v = logits.shape
    prompt = prompt_ids.masked_fill(prompt_mask == 0, v).clamp(max=v)
    seen_prompt = torch.zeros(n, v + 1, dtype=torch.bool, device=logits.device).scatter_(1, prompt, True)
    hits = torch.zeros(n, c, v + 1, dtype=torch.uint8, device=logits.device)
    hits.scatter_(2, completion_ids.clamp(max=v).unsqueeze(-1), 1)
    seen_before = torch.cat([torch.zeros_like(hits[:, :1]), hits[:, :-1].cummax(1).values], dim=1)
    seen = (seen_before.bool() | seen_prompt.unsqueeze(1))[..., :v]
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


#: The fields of a ``GenerationConfig`` that shape the distribution answers are drawn from (reported by
#: :func:`settings_summary`); the first seven apply only when sampling.
DISTRIBUTION_FIELDS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
                       "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens",
                       "sequence_bias", "num_beams", "max_new_tokens", "min_new_tokens")


def chat_generation_config(model: Any, *, stop_ids: Sequence[int], pad_token_id: int | None, max_new_tokens: int,
                           do_sample: bool, **generate_kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """The complete ``GenerationConfig`` of a user-facing ``generate`` (chat, comparisons, rating sessions), and the
    keyword arguments that are not generation settings (``streamer``...).

    The model's own ``generation_config`` (its authors' chat defaults: Qwen2.5-Instruct's ``repetition_penalty``
    1.05, and when sampling its ``temperature``/``top_p``/``top_k``) is what a person chatting with it expects, so it
    is the start; the call's ``generate_kwargs`` override it, then transformers' global defaults fill what neither
    sets (``top_k`` 50 when sampling). The SDK's stop and length always win over the model's file: ``eos_token_id``
    is ``stop_ids``, ``max_new_tokens`` the call's, and a ``min_length``/``min_new_tokens`` of the model's (which
    would hold the stop back) is dropped, unless the call gives them itself. Generate with the config under
    :func:`only_these_settings`, so that transformers merges nothing more into it.
    """
    import copy

    from transformers import GenerationConfig

    own = getattr(model, "generation_config", None)
    config = copy.deepcopy(own) if isinstance(own, GenerationConfig) else GenerationConfig()
    chosen = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "eos_token_id": list(stop_ids),
              "pad_token_id": pad_token_id, "min_length": 0, "min_new_tokens": None}
    settings = {k: v for k, v in generate_kwargs.items() if hasattr(config, k)}
    config.update(**{**chosen, **settings})
    if not config.do_sample:  # greedy: the sampling-only settings don't apply (and would be warned about)
        for name in DISTRIBUTION_FIELDS[:7]:
            setattr(config, name, None)
    defaults = getattr(GenerationConfig, "_get_default_generation_params", lambda: {})()
    config.update(**{k: defaults[k] for k in ("do_sample", *DISTRIBUTION_FIELDS) if k in defaults},
                  defaults_only=True)
    return config, {k: v for k, v in generate_kwargs.items() if k not in settings}


def settings_summary(config: Any) -> dict[str, Any]:
    """The settings of ``config`` that shape the answers, as a JSON-ready dict: ``do_sample``, ``temperature`` (when
    sampling), ``max_new_tokens``, each other :data:`DISTRIBUTION_FIELDS` setting that is on (not unset, not at its
    "off" value: ``top_p`` 1, ``top_k`` 0, ``repetition_penalty`` 1...; the sampling ones only when it samples),
    and the ``stop_token_ids``: what a rating session records beside the ratings it collects.

    >>> from transformers import GenerationConfig
    >>> settings_summary(GenerationConfig(do_sample=False, temperature=0.7, repetition_penalty=1.05, top_p=1.0,
    ...                                   max_new_tokens=64, eos_token_id=2))
    {'do_sample': False, 'max_new_tokens': 64, 'repetition_penalty': 1.05, 'stop_token_ids': [2]}
    """
    summary: dict[str, Any] = {"do_sample": bool(config.do_sample)}
    if config.do_sample and config.temperature is not None:
        summary["temperature"] = config.temperature
    if config.max_new_tokens is not None:
        summary["max_new_tokens"] = config.max_new_tokens
    for name in DISTRIBUTION_FIELDS if config.do_sample else DISTRIBUTION_FIELDS[7:]:
        value = getattr(config, name, None)
        if name not in summary and value is not None and value != _OFF.get(name) and value != []:
            summary[name] = value
    summary["stop_token_ids"] = _as_list(config.eos_token_id)
    return summary


#: The value of each setting at which it changes nothing.
_OFF: dict[str, Any] = {"top_k": 0, "top_p": 1.0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
                        "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "num_beams": 1, "min_new_tokens": 0}


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


@contextmanager
def only_these_settings(model: Any, config: Any) -> Iterator[Any]:
    """While the block runs, ``config`` is the generation config of ``model`` and of every module under it that
    holds one (a PEFT wrapper's base model): ``model.generate(..., generation_config=config)`` then merges nothing
    from the model's own ``generation_config.json``. Put back afterwards, even on an error."""
    holders = [m for m in _self_and_modules(model) if "generation_config" in getattr(m, "__dict__", {})]
    saved = [m.__dict__["generation_config"] for m in holders]
    for module in holders:
        module.__dict__["generation_config"] = config
    try:
        yield config
    finally:
        for module, original in zip(holders, saved):
            module.__dict__["generation_config"] = original


def _self_and_modules(model: Any) -> list[Any]:
    modules = list(model.modules()) if hasattr(model, "modules") else []
    return modules if model in modules else [model, *modules]
