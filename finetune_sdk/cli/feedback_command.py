"""``finetune feedback``: rate a model's answers in the terminal; ratings go to a file the formatters read."""

from __future__ import annotations

import click

from finetune_sdk.cli.inference_commands import TRUST_HELP

MODE_HELP = ("thumbs: one answer, thumbs up/down -> KTO rows (prompt, completion, label); pairwise: two answers, "
             "the better one -> preference rows (prompt, chosen, rejected), or a tie / both bad (recorded, not "
             "trained on)")
RATER_HELP = ("your name, recorded in each row (default: $FINETUNE_SDK_RATER; without either no name is recorded: "
              "ratings files get shared)")


@click.command("feedback")
@click.argument("ref")
@click.option("--prompts", "prompt_file", required=True,
              help="a text file with one prompt per line (or a .jsonl file with a prompt column)")
@click.option("--out", "-o", required=True, help="the ratings file (JSON Lines) to append to; created when missing")
@click.option("--mode", type=click.Choice(["thumbs", "pairwise"]), default="thumbs", show_default=True,
              help=MODE_HELP)
@click.option("--sft-out", help="a separate file for answers you write or correct (key e): prompt/completion rows "
                                "for chatml or chat-template")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.8, show_default=True, type=click.FloatRange(min=0),
              help="sampling temperature; 0 is greedy (thumbs mode only)")
@click.option("--seed", default=0, show_default=True, type=int,
              help="the same seed shows the same answers again; change it for new ones")
@click.option("--formatter", "-f", help="override the formatter recorded with the result")
@click.option("--rater", help=RATER_HELP)
@click.option("--trust-remote-code", is_flag=True, help=TRUST_HELP)
def feedback_command(ref: str, prompt_file: str, out: str, mode: str, sft_out: str | None, max_new_tokens: int,
                     temperature: float, seed: int, formatter: str | None, rater: str | None,
                     trust_remote_code: bool) -> None:
    """Rate the answers of REF (a result, registry reference or base model) to each prompt.

    Each rating is appended to --out (and flushed to disk) the moment you give it. Run the same command again to
    go on: prompts that already have a row are passed over. Keys, then Enter: u/d thumbs up/down, or 1/2 the
    better answer, t a tie, b both bad; e write a better answer (with --sft-out); s skip; q quit. Each row also
    records when it was rated, the model version and its sampling settings (and --rater).

    \b
    Example:
      finetune feedback runs/qa --prompts questions.txt --out ratings.jsonl
      finetune train --model models/my-llama --data ratings.jsonl --formatter kto -o runs/qa-kto
    """
    from finetune_sdk.feedback.session import MODES, collect_feedback
    from finetune_sdk.feedback.rating_prompt import TerminalRater

    terminal = TerminalRater(edits=sft_out is not None)
    summary = collect_feedback(ref, prompt_file, out, mode=mode, ask=terminal, sft_out=sft_out,
                               max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                               formatter=formatter, trust_remote_code=trust_remote_code, rater=rater)
    parts = [f"{summary.rated} rating{'s' * (summary.rated != 1)} appended to {summary.out}"]
    if summary.sft_out is not None:
        parts.append(f"{summary.edited} written answer{'s' * (summary.edited != 1)} to {summary.sft_out}")
    if summary.unranked:
        parts.append(f"{summary.unranked} tie/both-bad (recorded, not trained on)")
    if summary.skipped:
        parts.append(f"{summary.skipped} skipped")
    if summary.remaining:
        parts.append(f"{summary.remaining} left for the next session")
    if summary.torn_bytes_cut:
        parts.append(f"an unfinished row ({summary.torn_bytes_cut} bytes) of an interrupted session cut")
    terminal.note("; ".join(parts))
    if summary.out_rows:
        terminal.note(f"train on the ratings: finetune train --data {summary.out} --formatter "
                      f"{MODES[mode].formatter} ...")
    if summary.edited:
        terminal.note(f"train on the written answers: finetune train --data {summary.sft_out} --formatter chatml ...")
