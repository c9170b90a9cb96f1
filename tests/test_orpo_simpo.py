"""ORPO (Hong et al., 2024) and SimPO (Meng et al., 2024): reference-free preference objectives on ``preference``
rows, chosen with ``objective=``; their losses match TRL's formulas computed by hand, and their held-out preference
accuracy rises above chance on a learnable preference with lora, full and qlora."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from finetune_sdk import Trainer
from finetune_sdk.errors import ConfigError
from finetune_sdk.objectives.orpo import orpo_loss
from finetune_sdk.objectives.reference_free import average_logps, evaluate_reference_free, nll_term
from finetune_sdk.objectives.simpo import simpo_loss

#: A learnable preference the untrained tiny model ranks the other way round (its held-out accuracy starts at or
#: below chance): the pairs prefer a plain refusal over the sum.
TRAIN = [{"prompt": f"what is {a} plus {b}?", "chosen": f"I do not know {a} {b}.",
          "rejected": f"{a} plus {b} is {a + b}."} for a in range(4) for b in range(4)]
HELD_OUT = [{"prompt": f"what is {a} plus {b}?", "chosen": f"I do not know {a} {b}.",
             "rejected": f"{a} plus {b} is {a + b}."} for a, b in [(4, 1), (5, 2), (1, 5), (6, 0), (3, 4), (0, 6)]]
SETTINGS = {"lora": {"learning_rate": 2e-2, "target_modules": "all-linear", "r": 16},
            "qlora": {"learning_rate": 2e-2}, "full": {"learning_rate": 2e-3}}


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_orpo_loss_is_trls_odds_ratio_term_by_hand():
    # mean token log-probs: chosen log P = -0.5, rejected -1.0; beta (lambda) 0.1
    chosen, rejected, beta = -0.5, -1.0, 0.1
    log_odds = (chosen - rejected) - (math.log(1 - math.exp(chosen)) - math.log(1 - math.exp(rejected)))
    # log(1 - e^-0.5) = -0.932752, log(1 - e^-1) = -0.458675: log_odds = 0.5 - (-0.932752 + 0.458675)
    assert log_odds == pytest.approx(0.5 + 0.474077, abs=1e-6)
    losses, margin = orpo_loss(torch.tensor([chosen]), torch.tensor([rejected]), beta)
    assert float(losses[0]) == pytest.approx(-beta * log_sigmoid(log_odds), rel=1e-6)
    assert float(margin[0]) == pytest.approx(beta * (chosen - rejected), rel=1e-6)
    # the whole loss: NLL of the chosen tokens (summed log-probs -3.0 over 6 tokens: 0.5) minus beta * log sigmoid
    sums, counts = torch.tensor([-3.0, -4.0]), torch.tensor([6, 4])
    means, counts = average_logps(sums, counts)
    assert means.tolist() == [-0.5, -1.0]
    assert float(nll_term(sums[:1], counts[:1].sum())) == 0.5


def test_simpo_loss_is_trls_simpo_by_hand():
    chosen, rejected, beta, gamma = -0.5, -1.25, 2.0, 1.0
    losses, margin = simpo_loss(torch.tensor([chosen, rejected]), torch.tensor([rejected, chosen]), beta, gamma)
    # -log sigmoid(beta * (lc - lr) - gamma): 2 * 0.75 - 1 = 0.5, and 2 * -0.75 - 1 = -2.5
    assert losses.tolist() == pytest.approx([-log_sigmoid(0.5), -log_sigmoid(-2.5)], rel=1e-6)
    assert margin.tolist() == pytest.approx([1.5, -1.5])
    # TRL writes the margin inside as beta * (pi_logratios - gamma / beta): the same number
    assert float(losses[0]) == pytest.approx(-log_sigmoid(beta * ((chosen - rejected) - gamma / beta)), rel=1e-6)


def test_held_out_metrics_by_hand():
    from finetune_sdk.data.encoding import Encoded

    class Fixed(torch.nn.Module):
        """A 'model' whose every next-token log-prob is log(1/2) for token 1 and log(1/4) for token 2."""

        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))  # where the SDK looks for the device

        def forward(self, input_ids, attention_mask):
            logits = torch.log(torch.tensor([0.25, 0.5, 0.25])).expand(*input_ids.shape, 3)
            return type("Out", (), {"logits": logits})()

    def seq(answer):
        return {"input_ids": [0, *answer], "labels": [-100, *answer]}

    encoded = Encoded(examples=[{"chosen": seq([1, 1]), "rejected": seq([2])},   # mean -0.693 vs -1.386: right
                                {"chosen": seq([2, 2]), "rejected": seq([1])}])  # wrong
    metrics = evaluate_reference_free(Fixed(), encoded, lambda c, r: simpo_loss(c, r, 2.0, 0.0), 0.0, 2.0)
    assert metrics["reward_accuracy"] == 0.5 and metrics["reward_ties"] == 0
    assert metrics["reward_margin"] == pytest.approx(0.0, abs=1e-9)  # +2 ln 2 * ... and its negative
    assert metrics["logp_margin"] == pytest.approx(((2 * math.log(0.5) - math.log(0.25)) +
                                                    (2 * math.log(0.25) - math.log(0.5))) / 2)
    assert metrics["nll_loss"] == pytest.approx(-(2 * math.log(0.5) + 2 * math.log(0.25)) / 4)


def preference_accuracy(model_dir, technique, objective, options):
    """The untrained policy's held-out accuracy under ``objective``."""
    from finetune_sdk.data.rows import load_rows
    from finetune_sdk.objectives import get_objective, run_options
    from finetune_sdk.data.pairs import encode_preference

    spec = get_objective(objective)
    options = run_options(spec, options)
    base = Trainer(model_dir, technique=technique, formatter="preference", progress=False).current_model()
    held = encode_preference(load_rows(HELD_OUT), base.formatter, base.tokenizer, options)
    return evaluate_reference_free(base.model, held, spec.pair_loss(options), spec.nll_weight(options),
                                   options["beta"])["reward_accuracy"]


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
@pytest.mark.parametrize("technique", ["lora", pytest.param("full", marks=pytest.mark.slow),
                                       pytest.param("qlora", marks=pytest.mark.slow)])
def test_held_out_preference_accuracy_rises_above_chance(tiny_models, tmp_path, technique, objective):
    trainer = Trainer(tiny_models("llama"), technique=technique, formatter="preference", output_dir=tmp_path / "o",
                      num_train_epochs=4, save_steps=0, progress=False, **SETTINGS[technique])
    result = trainer.fit(TRAIN, eval_data=HELD_OUT, objective=objective)
    m = result.metrics
    assert result.manifest["objective"] == objective and "objective" not in trainer.options or \
        trainer.options["objective"] is None
    before = preference_accuracy(tiny_models("llama"), technique, objective, trainer.options)
    print(f"{objective} {technique}: held-out accuracy {before:.2f} -> {m['reward_accuracy']:.2f}")
    assert before <= 0.5 and m["reward_accuracy"] >= 5 / 6, (before, m)
    assert m["eval_rows_scored"] == 6 and m["reward_margin"] > 0
    assert result.manifest["options"]["beta"] == {"orpo": 0.1, "simpo": 2.0}[objective]


def test_orpo_from_the_cli_and_its_options_only_with_it(tiny_models, tmp_path):
    from finetune_sdk.cli import cli

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in TRAIN[:4]))
    args = ["train", "--model", str(tiny_models("llama")), "--data", str(data), "--max-steps", "2", "--save-steps", "0"]
    done = CliRunner().invoke(cli, [*args, "--objective", "orpo", "--beta", "0.3", "-o", str(tmp_path / "run")])
    assert done.exit_code == 0, done.output
    manifest = json.loads((tmp_path / "run" / "finetune_manifest.json").read_text())
    assert manifest["objective"] == "orpo" and manifest["options"]["beta"] == 0.3
    assert "simpo_gamma" not in manifest["options"] and "num_generations" not in manifest["options"]
    bad = CliRunner().invoke(cli, [*args, "--objective", "orpo", "--simpo-gamma", "1", "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert "option 'simpo_gamma' is an option of objective 'simpo', not of 'orpo'" in bad.output
    assert not (tmp_path / "bad").exists()


def test_an_objective_for_other_rows_is_one_line(tiny_models, tmp_path):
    trainer = Trainer(tiny_models("llama"), output_dir=tmp_path / "o", progress=False, objective="simpo")
    with pytest.raises(ConfigError, match="objective 'simpo' trains on preference rows with a causal-lm technique, "
                                          "but this run has causal-lm rows"):
        trainer.fit([{"prompt": "a", "completion": "b"}] * 2)
    with pytest.raises(ConfigError, match="unknown objective 'orp0'.*did you mean 'orpo'"):
        Trainer(tiny_models("llama"), progress=False, objective="orp0")
    with pytest.raises(ConfigError, match="objective 'orpo' trains a causal-lm technique, not 'classifier'"):
        Trainer(tiny_models("llama"), technique="classifier", progress=False, objective="orpo")
    assert not (tmp_path / "o").exists()


def test_help_shows_an_objectives_options_only_with_it_and_imports_no_torch():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom finetune_sdk.cli.main import cli\n"
            "r = CliRunner()\nplain = r.invoke(cli, ['train', '--help']).output\n"
            "simpo = r.invoke(cli, ['train', '--objective', 'simpo', '--help']).output\n"
            "export = r.invoke(cli, ['export', '--help']).output\n"
            "print(repr((plain, simpo, export, 'torch' in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"FINETUNE_SDK_DISABLE_PLUGIN_AUTOLOAD": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "200"})
    plain, simpo, export, torch_imported = eval(done.stdout.strip().splitlines()[-1])  # noqa: S307 - our own repr
    assert not torch_imported
    assert "--simpo-gamma" not in plain and "--num-generations" not in plain and "--objective" in plain
    assert "--objective NAME --help" in plain
    assert "--simpo-gamma" in simpo and "target reward margin gamma" in simpo and "[default: 2.0]" in simpo
    assert "--num-generations" not in simpo and "--desirable-weight" not in simpo
    assert "[gguf]" in export.replace("\n", " ").replace("  ", " ") or "gguf" in export
