"""The contract every technique, quantizer and formatter passes, builtin or third-party.

Plugin authors subclass these in their own test suite (pytest collects classes named ``Test*``):

    from finetune_sdk.testing import FormatterContract, TechniqueContract

    class TestMyTechnique(TechniqueContract):
        name = "my-technique"

    class TestMyFormatter(FormatterContract):
        name = "my-formatter"

Each test builds a tiny model in code, so the suite runs offline on a CPU in seconds.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from finetune_sdk.errors import DataError
from finetune_sdk.formatter import CAUSAL_LM, CLASSIFICATION, PROMPT, REWARD, TASKS, Formatter, Segment
from finetune_sdk.options import Option
from finetune_sdk.plugin_manager import get_plugin_host
from finetune_sdk.quantizer import Quantizer
from finetune_sdk.technique import Technique
from finetune_sdk.testing.chat_contract import check_chat_round_trip
from finetune_sdk.testing.light import heavy_imports
from finetune_sdk.testing.special_tokens import (TOKENIZER_VARIANTS, content_with_specials, ends_with_one_eos,
                                                 inject_special_tokens, variant_tokenizer)
from finetune_sdk.testing.steering_contract import SteeringContract
from finetune_sdk.testing.tiny import save_tiny_model, tiny_tokenizer
from finetune_sdk.testing.turns import TURN_FORMATS, trained_end_of_turn, turn_tokenizer

CAUSAL_ROWS = [{"prompt": f"what is {w}?", "completion": f"{w} is a {c}."}
               for w, c in [("red", "colour"), ("cat", "animal"), ("blue", "colour"), ("dog", "animal"),
                            ("fish", "animal"), ("green", "colour"), ("bird", "animal"), ("yellow", "colour")]]
CLASSIFICATION_ROWS = [{"text": f"the {w} is here", "label": c}
                       for w, c in [("red", "colour"), ("cat", "animal"), ("blue", "colour"), ("dog", "animal"),
                                    ("fish", "animal"), ("green", "colour"), ("bird", "animal"),
                                    ("yellow", "colour")]]
PREFERENCE_ROWS = [{"prompt": f"what is {w}?", "chosen": f"{w} is a {c}, thanks.", "rejected": f"{w}?"}
                   for w, c in [("red", "colour"), ("cat", "animal"), ("blue", "colour"), ("dog", "animal"),
                                ("fish", "animal"), ("green", "colour"), ("bird", "animal"), ("yellow", "colour")]]
#: The rows and formatter the technique contract trains on, by the technique's task.
ROWS_BY_TASK = {CAUSAL_LM: (CAUSAL_ROWS, "chatml"), CLASSIFICATION: (CLASSIFICATION_ROWS, "classification"),
                REWARD: (PREFERENCE_ROWS, "preference")}


def _check_options(options: Any) -> None:
    assert isinstance(options, tuple)
    names = [o.name for o in options]
    assert len(names) == len(set(names)), f"duplicate option names: {names}"
    for option in options:
        assert isinstance(option, Option)
        assert option.help, f"option {option.name!r} has no help text"
        if option.default is not None:
            assert option.coerce(option.default) == option.default


def assert_light(cls: type) -> None:
    """The module defining ``cls`` (and its package) import no heavy library at import time."""
    package = cls.__module__.split(".")[0]
    heavy = heavy_imports(cls.__module__) + (heavy_imports(package) if package != "finetune_sdk" else [])
    assert not heavy, f"move these imports into the functions that use them: {'; '.join(heavy)}"


class TechniqueContract(SteeringContract):
    """Tests every technique passes. Set ``name``; tune ``learning_rate``/``epochs`` if your method needs it."""

    name: ClassVar[str]
    learning_rate: ClassVar[float] = 5e-3
    epochs: ClassVar[float] = 4
    family: ClassVar[str] = "llama"

    @pytest.fixture(scope="class")
    def model_dir(self, tmp_path_factory: pytest.TempPathFactory) -> Any:
        return save_tiny_model(tmp_path_factory.mktemp("contract-model") / self.family, self.family)

    def technique(self) -> Technique:
        return get_plugin_host().create("technique", self.name)

    def rows(self) -> list[dict[str, Any]]:
        return ROWS_BY_TASK[self.technique().task][0]

    def formatter_name(self) -> str:
        return ROWS_BY_TASK[self.technique().task][1]

    def test_metadata(self) -> None:
        technique = self.technique()
        assert isinstance(technique, Technique)
        assert technique.name == self.name
        assert technique.task in ROWS_BY_TASK
        assert technique.description
        _check_options(technique.options)
        default = technique.default_quantizer
        quantizer = get_plugin_host().create("quantizer", default) if default else None
        assert technique.accepts_quantizer(quantizer), "the default quantizer must be accepted"

    def test_plugin_module_imports_nothing_heavy(self) -> None:
        """``finetune --help`` imports every plugin module: torch, transformers... only inside functions."""
        assert_light(get_plugin_host().registration("technique", self.name).cls)

    def test_trains_saves_and_reloads(self, model_dir: Any, tmp_path: Any) -> None:
        import torch

        import finetune_sdk
        from finetune_sdk import Trainer

        trainer = Trainer(model_dir, technique=self.name, formatter=self.formatter_name(), output_dir=tmp_path / "out",
                          num_train_epochs=self.epochs, learning_rate=self.learning_rate,
                          per_device_train_batch_size=2, progress=False, seed=0)
        before = trainer.evaluate(self.rows())["eval_loss"]
        result = trainer.fit(self.rows())
        after = trainer.evaluate(self.rows())["eval_loss"]
        assert after < before, f"loss did not fall: {before:.4f} -> {after:.4f}"
        metrics = result.metrics
        assert 0 < metrics["trainable_parameters"] <= metrics["total_parameters"]
        for key in ("train_loss", "train_runtime", "train_tokens_per_second"):
            assert key in metrics
        assert (result.output_dir / "finetune_manifest.json").is_file()
        assert not list(result.output_dir.rglob("*.bin")) and not list(result.output_dir.rglob("*.pt")), \
            "results are safetensors only"

        loaded = finetune_sdk.load(result.output_dir)
        trained = trainer.current_model()
        batch = trained.tokenizer(["what is red?", "the cat is here"], return_tensors="pt", padding=True)
        with torch.no_grad():
            trained.model.eval()
            expected = trained.model(**batch).logits
            actual = loaded.model(**batch).logits
        assert torch.allclose(expected, actual, atol=1e-5), (expected - actual).abs().max()

    def test_merge_starts_from_the_stored_base(self, model_dir: Any, tmp_path: Any) -> None:
        """A merge (and an export, which merges the same way) reads the base from disk in float32, never the
        training copy (a bfloat16 base here, or 4-bit weights), and folds the trained weights in in float32: the
        input embeddings (which no adapter trains) are bit-identical to the stored ones and the merged model
        computes what the unmerged float32 one does. A technique whose result is the model itself loads, with
        ``quantized=False``, exactly the weights it saved."""
        from pathlib import Path

        import torch
        from safetensors.torch import load_file

        import finetune_sdk

        technique = self.technique()
        if technique.task != CAUSAL_LM or not (technique.saves_adapter or technique.result_is_model):
            return  # merge() and export() refuse it: nothing of this kind to check
        options = {} if technique.default_quantizer else {"dtype": "bfloat16"}  # a copy unlike the stored base
        result = self._short_run(model_dir, tmp_path / "out", **options).output_dir
        unmerged = finetune_sdk.load(result, quantized=False)
        if technique.result_is_model:
            saved = load_file(str(result / "model.safetensors"))
            for name, param in unmerged.model.state_dict().items():
                assert name not in saved or torch.equal(param, saved[name].float()), f"{name} is not as saved"
            return
        merged_dir = finetune_sdk.merge(result, tmp_path / "merged", dtype="float32")
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
        assert all(p.dtype == torch.float32 for p in merged.parameters())
        stored = load_file(str(next(Path(model_dir).glob("*.safetensors"))))
        embedding = merged.get_input_embeddings().weight
        name = next(n for n, p in merged.named_parameters() if p is embedding)
        assert torch.equal(embedding.detach(), stored[name]), "the embeddings carry the training copy's rounding"
        batch = unmerged.tokenizer(["what is red?", "the cat is here"], return_tensors="pt", padding=True)
        with torch.no_grad():
            expected = unmerged.model(**batch).logits
            actual = merged(**batch).logits
        assert torch.allclose(expected, actual, atol=1e-5), (expected - actual).abs().max()


    def _short_run(self, model_dir: Any, output_dir: Any, **options: Any) -> Any:
        from finetune_sdk import Trainer

        trainer = Trainer(model_dir, technique=self.name, formatter=self.formatter_name(), output_dir=output_dir,
                          max_steps=3, learning_rate=self.learning_rate, per_device_train_batch_size=4,
                          logging_steps=1, save_steps=0, progress=False, seed=0, **options)
        return trainer.fit(self.rows())

    @pytest.fixture(scope="class")
    def default_run(self, model_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
        return self._short_run(model_dir, tmp_path_factory.mktemp("contract-default") / "out")

    @pytest.mark.parametrize("option", ["gradient_checkpointing", "packing"])
    def test_training_options_work(self, model_dir: Any, tmp_path: Any, default_run: Any, option: str) -> None:
        """``gradient_checkpointing=True`` and ``packing=False`` train (or are refused before the model loads) and
        learn what the default run learns: recomputing activations and padding instead of packing change memory
        and speed, never the losses."""
        import math

        from finetune_sdk.errors import ConfigError

        # gradient_checkpointing=True; packing=False with the same (random) batches as the packed default run
        options = {"gradient_checkpointing": True} if option == "gradient_checkpointing" else \
            {"packing": False, "group_by_length": False}
        value = options[option]
        try:
            result = self._short_run(model_dir, tmp_path / "out", **options)
        except ConfigError as exc:  # refused up front is allowed; failing mid-run is not
            assert "Traceback" not in str(exc)
            return
        losses = [e["loss"] for e in result.log_history if "loss" in e]
        expected = [e["loss"] for e in default_run.log_history if "loss" in e]
        assert len(losses) == len(expected) == 3 and all(math.isfinite(x) for x in losses)
        assert losses == pytest.approx(expected, rel=2e-3, abs=1e-4), \
            f"{option}={value} changed the losses: {losses} vs {expected}"


class QuantizerContract:
    """Tests every quantizer passes. Set ``name``."""

    name: ClassVar[str]

    def quantizer(self) -> Quantizer:
        return get_plugin_host().create("quantizer", self.name)

    @pytest.fixture(scope="class")
    def model_dir(self, tmp_path_factory: pytest.TempPathFactory) -> Any:
        # hidden size 96: in_features that are not a multiple of 64 catch bitsandbytes' CPU repack bug
        return save_tiny_model(tmp_path_factory.mktemp("quantizer-model") / "llama", "llama", hidden_size=96)

    def load(self, model_dir: Any) -> Any:
        import torch

        from finetune_sdk.models.sources import load_model, resolve_source

        quantizer = self.quantizer()
        model = load_model(resolve_source(model_dir), CAUSAL_LM, dtype=torch.float32,
                           quantization_config=quantizer.quantization_config({}))
        quantizer.after_load(model)
        return model

    def test_metadata(self) -> None:
        quantizer = self.quantizer()
        assert isinstance(quantizer, Quantizer)
        assert quantizer.name == self.name and quantizer.description
        assert isinstance(quantizer.bits, int) and 1 <= quantizer.bits <= 16
        _check_options(quantizer.options)

    def test_plugin_module_imports_nothing_heavy(self) -> None:
        """``finetune --help`` imports every plugin module: torch, transformers... only inside functions."""
        assert_light(get_plugin_host().registration("quantizer", self.name).cls)

    def test_quantized_model_runs_and_is_smaller(self, model_dir: Any) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = self.load(model_dir)
        ids = torch.tensor([[1, 5, 9, 12, 30]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        assert torch.isfinite(logits).all()
        if self.quantizer().bits < 16:
            assert model.get_memory_footprint() < full.get_memory_footprint()

    def test_gradients_unchanged_by_an_eval_generate(self, model_dir: Any) -> None:
        """Training after ``generate()`` must see the same gradients as training without it."""
        import torch
        from peft import LoraConfig, get_peft_model

        from finetune_sdk.log import known_dependency_warnings

        def lora_grads(generate_first: bool) -> dict[str, torch.Tensor]:
            model = self.load(model_dir)
            ids = torch.tensor([[1, 5, 9, 12, 30, 41]])
            if generate_first:
                model.eval()
                with torch.no_grad():
                    model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=3)
            torch.manual_seed(0)
            with known_dependency_warnings():
                peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0,
                                                              init_lora_weights=False))
            peft_model.train()
            peft_model(input_ids=ids, labels=ids).loss.backward()
            return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}

        plain, after_generate = lora_grads(False), lora_grads(True)
        assert plain.keys() == after_generate.keys() and plain
        for name in plain:
            assert torch.allclose(plain[name], after_generate[name], atol=1e-5), name


class FormatterContract:
    """Tests every formatter passes. Set ``name``; the formatter's ``example`` row is used as data."""

    name: ClassVar[str]

    def formatter(self) -> Formatter:
        return get_plugin_host().create("formatter", self.name)

    def test_metadata_and_example(self) -> None:
        formatter = self.formatter()
        assert isinstance(formatter, Formatter)
        assert formatter.name == self.name and formatter.description
        assert formatter.task in TASKS
        assert formatter.column_sets, "declare the columns the formatter reads"
        assert formatter.example, "give an example row"
        formatter.validate(formatter.example, "example")
        assert formatter.accepts(list(formatter.example))

    def test_plugin_module_imports_nothing_heavy(self) -> None:
        """``finetune --help`` imports every plugin module: torch, transformers... only inside functions."""
        assert_light(get_plugin_host().registration("formatter", self.name).cls)

    def test_missing_columns_name_the_row(self) -> None:
        with pytest.raises(DataError, match="train.jsonl line 3"):
            self.formatter().validate({"unrelated": "x"}, "train.jsonl line 3")

    def test_answer_and_eos_are_learnt_prompt_is_not(self) -> None:
        from finetune_sdk.data.encoding import IGNORE_INDEX, encode_segments

        formatter = self.formatter()
        tokenizer = tiny_tokenizer()
        if formatter.task == CLASSIFICATION:
            text, label = formatter.text_and_label(formatter.example)
            assert isinstance(text, str) and label is not None
            return
        segments = formatter.segments(formatter.example, tokenizer, {"max_length": 512})
        assert all(isinstance(s, Segment) for s in segments)
        encoded = encode_segments(segments, tokenizer, None)
        if formatter.task == PROMPT:  # prompts only (GRPO): the policy writes the answers, nothing is learnt here
            assert segments and not any(s.train for s in segments)
            assert encoded["input_ids"] == encode_segments(
                formatter.prompt_segments(formatter.example["prompt"], tokenizer, {}), tokenizer, None)["input_ids"]
            return
        assert any(label != IGNORE_INDEX for label in encoded["labels"]), "nothing to learn"
        assert encoded["labels"][-1] == tokenizer.eos_token_id or \
            tokenizer.eos_token_id in [lab for lab in encoded["labels"] if lab != IGNORE_INDEX], \
            "the answer's EOS must be in the loss"
        prompt = formatter.prompt_segments("hello there", tokenizer, {"max_length": 512})
        assert prompt and not any(s.train for s in prompt)

    def test_few_shot_examples_are_earlier_turns(self) -> None:
        """finetune bench and advise put few-shot examples ahead of the question in this format
        (``few_shot_segments``): each example is there, in order, and the question's turn ends as a lone prompt's."""
        from finetune_sdk.formatter import few_shot_segments

        formatter, tokenizer, question = self.formatter(), tiny_tokenizer(), "what is 3 plus 1?"
        if formatter.task != CAUSAL_LM or formatter.concatenates:
            return
        examples = [("what is 1 plus 1?", "1 plus 1 is 2."), ("what is 2 plus 1?", "2 plus 1 is 3.")]
        rendered = "".join(s.text for s in few_shot_segments(formatter, examples, question, tokenizer, {}))
        prompt = "".join(s.text for s in formatter.prompt_segments(question, tokenizer, {}))
        assert all(q in rendered and a in rendered for q, a in examples), rendered
        assert rendered.index(examples[0][1]) < rendered.index(examples[1][0]) < rendered.rindex(question)
        assert rendered.endswith(prompt.split(question, 1)[1]), "the question's turn must end as prompt_segments'"

    @pytest.mark.parametrize("variant", TOKENIZER_VARIANTS)
    def test_content_is_never_control_tokens(self, variant: str) -> None:
        """Row content holding every special-token string encodes without special ids and ends with one EOS."""
        from finetune_sdk.data.encoding import encode_plain, encode_segments

        formatter = self.formatter()
        tokenizer = variant_tokenizer(variant)
        special = set(tokenizer.all_special_ids)
        clean, injected = dict(formatter.example), inject_special_tokens(formatter, tokenizer)
        assert injected != clean, "the example row has no content field to check"
        formatter.validate(injected, "example with special-token strings")

        def counts(ids: list[int]) -> dict[int, int]:
            return {i: ids.count(i) for i in special}

        if formatter.task == CLASSIFICATION:
            encode = lambda row: encode_plain(formatter.text_and_label(row)[0], tokenizer)["input_ids"]  # noqa: E731
            assert counts(encode(injected)) == counts(encode(clean)), "special ids from row content"
            return
        try:
            expected = encode_segments(formatter.segments(clean, tokenizer, {"max_length": 4096}), tokenizer, None)
        except DataError:
            pytest.skip(f"{self.name} does not take this tokenizer ({variant})")
        actual = encode_segments(formatter.segments(injected, tokenizer, {"max_length": 4096}), tokenizer, None)
        ids = actual["input_ids"]
        assert counts(ids) == counts(expected["input_ids"]), \
            f"row content became special tokens: {tokenizer.convert_ids_to_tokens(ids)}"
        assert formatter.task == PROMPT or ends_with_one_eos(ids, tokenizer), f"must end with exactly one EOS: {tokenizer.convert_ids_to_tokens(ids)}"
        prompt = encode_segments(formatter.prompt_segments(content_with_specials(tokenizer), tokenizer, {}),
                                 tokenizer, None)["input_ids"]
        plain = encode_segments(formatter.prompt_segments("hello", tokenizer, {}), tokenizer, None)["input_ids"]
        assert counts(prompt) == counts(plain), "a generation prompt became special tokens"

    @pytest.mark.parametrize("own_template", [True, False], ids=["tokenizer-template", "no-template"])
    def test_exported_chat_format_renders_what_training_rendered(self, own_template: bool) -> None:
        """The export's GGUF chat template (and, with Go installed, its Modelfile TEMPLATE) renders one turn, one
        turn under a system prompt and a two-turn history token for token as training did."""
        formatter = self.formatter()
        if formatter.task == CLASSIFICATION:
            pytest.skip("a classification formatter renders no chat prompts")
        tokenizer = tiny_tokenizer(chat_template=own_template)
        try:
            formatter.prompt_segments("hello", tokenizer, {})
        except DataError:
            pytest.skip(f"{self.name} does not take a tokenizer {'with' if own_template else 'without'} a template")
        assert check_chat_round_trip(formatter, tokenizer, history_row=self.history_row()) >= 2

    def history_row(self) -> Any:
        """A function making a row of this formatter from a role/content message list (two answers), for the
        two-turn round trip; None: a ``messages`` row when the formatter takes one. Override it for other columns."""
        return None

    @pytest.mark.parametrize("chat_format", list(TURN_FORMATS))
    def test_generation_stops_at_the_end_of_turn(self, chat_format: str) -> None:
        """The token the formatter trains to end an answer (else its declared :meth:`Formatter.end_of_turn`) is a stop
        id, and ``generate()`` stops there: a model scripted to say two words and that token, over and over, answers
        the two words. Run with tokenizers whose turn ends with ``<|eot_id|>`` (Llama 3), ``<end_of_turn>`` (Gemma),
        ``<|end|>`` (Phi-3) and ``<|im_end|>`` (ChatML), EOS being another token."""
        from finetune_sdk.models.inference import LoadedModel
        from finetune_sdk.models.stop_tokens import single_token_id
        from finetune_sdk.testing.turns import plain_token_ids, scripted_model

        formatter = self.formatter()
        if formatter.task in (CLASSIFICATION, REWARD):
            return
        tokenizer = turn_tokenizer(chat_format)
        try:
            end = trained_end_of_turn(formatter, tokenizer)
        except DataError:
            pytest.skip(f"{self.name} does not take this tokenizer ({chat_format})")
        declared = [i for i in (single_token_id(tokenizer, t) for t in formatter.end_of_turn(tokenizer)) if i is not None]
        end = end if end is not None else (declared or [tokenizer.eos_token_id])[0]
        first, second = plain_token_ids(tokenizer, 2)
        model = scripted_model(tokenizer, {first: second, second: end}, default=first)
        loaded = LoadedModel(model, tokenizer, task=formatter.task, formatter=formatter, options={"max_length": 256})
        assert end in loaded.stop_ids(), \
            f"{tokenizer.convert_ids_to_tokens(end)} ends the answer but is no stop id: declare it in end_of_turn()"
        expected = tokenizer.decode([first, second, end], skip_special_tokens=True).strip()
        assert loaded.generate("hello there", max_new_tokens=9) == expected, "generation ran past the end of turn"
