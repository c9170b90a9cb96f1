"""Objectives as strategies, chosen in one place, and plans built without touching a model."""

from __future__ import annotations

import pytest

from finetune_sdk import Trainer
from finetune_sdk.advice.advisor import preflight
from finetune_sdk.errors import ConfigError
from finetune_sdk.advice.memory import estimated_technique
from finetune_sdk.objectives import Objective, get_objective, objective_for, registered_objectives
from finetune_sdk.training.planning import Planner
from finetune_sdk.technique import Technique
from finetune_sdk.testing.tiny import tiny_config, tiny_tokenizer
from finetune_sdk.training.engine import decide_packing

PAIRS = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)]
QA = [{"prompt": f"what is {i}?", "completion": f"{i}."} for i in range(4)]
LABELLED = [{"text": f"t{i}", "label": i % 3} for i in range(6)]


def test_one_place_chooses_the_objective():
    assert objective_for("causal-lm", "causal-lm").name == "sft"
    assert objective_for("preference", "causal-lm").name == "dpo"
    assert objective_for("preference", "classification").name == "classification-head"
    assert objective_for("classification", "classification").name == "classification-head"
    assert objective_for("kto", "causal-lm").name == "kto"
    assert objective_for("prompt", "causal-lm").name == "grpo"
    assert objective_for("preference", "reward").name == "reward-modeling"
    assert objective_for("preference", "causal-lm", "orpo").name == "orpo"
    assert {"sft", "dpo", "orpo", "simpo", "kto", "grpo", "classification-head", "reward-modeling"} <= \
        set(registered_objectives())
    assert all(isinstance(o, Objective) and get_objective(n) is o for n, o in registered_objectives().items())
    with pytest.raises(ConfigError, match="unknown objective 'dp0'.*did you mean 'dpo'"):
        get_objective("dp0")


def planner(model_dir, technique="lora", **options):
    trainer = Trainer(model_dir, technique=technique, progress=False, **options)
    return trainer, Planner(trainer.host, trainer.technique.task, trainer.options)


def test_plans_are_built_without_a_model(tiny_models):
    tok = tiny_tokenizer()
    trainer, plan_for = planner(tiny_models("llama"))
    sft = plan_for.plan(QA, QA[:2], tok, None)
    assert (sft.objective, sft.formatter.name, get_objective(sft.objective).packs) == ("sft", "chat-template", True)
    assert len(sft.train.examples) == 4 and set(sft.evals) == {""} and sft.labels is None
    dpo = plan_for.plan(PAIRS, None, tok, None)
    assert (dpo.objective, dpo.formatter_name) == ("dpo", "preference")
    assert {"chosen", "rejected"} <= set(dpo.train.examples[0]) and not get_objective(dpo.objective).packs
    assert trainer._current_model is None  # nothing was loaded


def test_classifier_plans_find_labels_and_turn_pairs_into_reward_rows(tiny_models):
    tok = tiny_tokenizer()
    trainer, plan_for = planner(tiny_models("llama"), technique="classifier")
    plan = plan_for.plan(LABELLED, None, tok, None)
    assert (plan.objective, plan.labels) == ("classification-head", ["0", "1", "2"])
    assert [ex["labels"] for ex in plan.train.examples] == [0, 1, 2, 0, 1, 2]
    assert trainer.options["labels"] is None  # the planner leaves the Trainer's options alone
    reward = plan_for.plan(PAIRS, PAIRS[:1], tok, None)
    assert (reward.formatter.name, reward.formatter_name, reward.labels) == ("preference", "classification",
                                                                            ["chosen", "rejected"])
    assert len(reward.train.examples) == 8 and len(reward.evals[""].encoded.examples) == 2


def test_packing_follows_the_objective(tiny_models):
    trainer, plan_for = planner(tiny_models("llama"))
    model = type("M", (), {"config": type("C", (), {"model_type": "llama"})()})()
    assert decide_packing(trainer, plan_for.plan(QA, None, tiny_tokenizer(), None), model)
    assert not decide_packing(trainer, plan_for.plan(PAIRS, None, tiny_tokenizer(), None), model)


class Dora(Technique):
    name = "dora-demo"
    trains = "adapter"


def test_plugin_techniques_are_estimated_by_what_they_train(monkeypatch):
    import finetune_sdk.advice.advisor as advisor

    monkeypatch.setattr(advisor, "available_memory", lambda device="auto": 2**40)
    config = tiny_config("llama", tiny_tokenizer())
    options = {"per_device_train_batch_size": 2, "max_length": 64, "r": 8}
    assert estimated_technique(Dora()) == "lora" and estimated_technique("dora-demo") is None
    assert preflight(config, Dora(), None, options, device="cpu").technique == "lora"
    assert preflight(config, type("Opaque", (Technique,), {"name": "opaque"})(), None, options, device="cpu") is None


def test_a_new_objective_is_a_plugin_not_a_branch(tiny_models, tmp_path, install):
    """A plugin's objective, registered through register_objectives, trains with fit(rows, objective=name); its own
    option is accepted only for it; nothing in the planner or engine names it."""
    from tests.test_plugins import FakeEntryPoint, plugin_module

    from finetune_sdk.objectives.sft import SupervisedFineTuning
    from finetune_sdk.options import Option

    batches = []

    class CountingObjective(SupervisedFineTuning):
        name = "counting-demo"
        packs = False
        default = False
        options = (Option("count_scale", float, 1.0, "demo: scales the count", minimum=0),)

        def collator(self, run, plan, tokenizer):
            inner = super().collator(run, plan, tokenizer)

            def collate(batch):
                batches.append(run.options["count_scale"])
                return inner(batch)
            return collate

        def evaluate(self, session, plan, name, run):
            return {"eval_rows_seen": float(len(plan.evals[name].rows))}

    install(FakeEntryPoint("counting", lambda: plugin_module(
        "finetune_sdk_counting", register_objectives=lambda register: register(CountingObjective))))
    trainer = Trainer(tiny_models("llama"), formatter="chatml", output_dir=tmp_path / "out", max_steps=2,
                      per_device_train_batch_size=2, progress=False)
    with pytest.raises(ConfigError, match="option 'count_scale' is an option of objective 'counting-demo', not of "
                                          "'sft'"):
        trainer.fit(QA, QA[:3], count_scale=2.0)
    result = trainer.fit(QA, QA[:3], objective="counting-demo", count_scale=2.0)
    assert len(batches) >= 2 and set(batches) == {2.0} and result.metrics["eval_rows_seen"] == 3.0
    assert result.manifest["objective"] == "counting-demo" and result.manifest["options"]["count_scale"] == 2.0
    assert "count_scale" not in trainer.options  # fit's options apply to that fit only
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_objective_options_are_resolved_for_the_chosen_objective_only(tiny_models):
    """TRL's names per objective (DPO beta 0.1, GRPO beta 0.04, SimPO beta 2.0): each objective's default; older
    names still work with a FutureWarning; another objective's option is one line."""
    tok = tiny_tokenizer()
    _, plan_for = planner(tiny_models("llama"))
    assert plan_for.plan(PAIRS, None, tok, None).options["beta"] == 0.1
    assert "beta" not in plan_for.plan(QA, None, tok, None).options  # sft takes no beta
    _, simpo = planner(tiny_models("llama"), objective="simpo", simpo_gamma=0.25)
    options = simpo.plan(PAIRS, None, tok, None).options
    assert (options["beta"], options["simpo_gamma"], options["cpo_alpha"]) == (2.0, 0.25, 0.0)
    with pytest.warns(FutureWarning, match="option 'dpo_beta' is now 'beta'"):
        _, old = planner(tiny_models("llama"), dpo_beta="0.5")
        assert old.plan(PAIRS, None, tok, None).options["beta"] == 0.5
    _, kto_only = planner(tiny_models("llama"), desirable_weight=2.0)
    with pytest.raises(ConfigError, match="option 'desirable_weight' is an option of objective 'kto', not of 'dpo', "
                                          "which this run trains; drop it or pass objective='kto'"):
        kto_only.plan(PAIRS, None, tok, None)
