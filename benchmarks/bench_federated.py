"""Federated (FedAvg on Flower, one SuperNode process per client) vs centralised training on the same data.

Three clients hold disjoint invented facts (non-IID); the held-out set asks every client's facts in other words.
Both sides train LoRA on the same seeded Llama-style model with the same batch and learning rate and see the same
number of examples: federated = rounds x local steps x batch x clients, centralised = one fit on the union with
that many examples. Reported: held-out loss on the union, wall time, and bytes moved (federated: adapter traffic
both ways over all rounds; centralised: the clients' data files uploaded once to the trainer).

    python benchmarks/bench_federated.py [--rounds 4] [--local-steps 4] [--facts 12] [--hidden 128]

``--variants fedavg,ffa,fedex,int8,nf4,hetlora,fedadam:eta=0.01,...`` compares aggregation methods, update compression and strategies on
the same 3 owners instead: each variant runs the SDK's server round loop and ClientApp in this process
(``finetune_sdk.testing.federated.run_in_process``: the same training, aggregation and byte counting as Flower's
runtime, without one process per client), and reports the union held-out loss, bytes moved and the largest
per-round distance of the global LoRA update to the clients' average update.

``--preference`` runs federated DPO instead: each owner holds private preference pairs about its own facts
(chosen: the right colour, rejected: a wrong one); the global adapter (FedAvg of DPO rounds, in-process rounds)
and each owner's local-only DPO adapter (as many steps as the owner trains in the federation) are scored on the
union of held-out pairs (the same facts asked in other words) by preference accuracy: the share of pairs whose
implicit reward margin ``(logp_c - base_c) - (logp_r - base_r)`` against the base model is positive.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PLACES = ("Quill Dover Ash Bramble Tin Orrin Vex Callo Marrow Pelling Sunder Widder Fen Gorse Hollin Ivel Jasper "
          "Kestle Larch Moss Nettle Oakum Pike Rook Sedge Thorn Umber Vale Wick Yarrow Zeal Alder").split()
COLOURS = ("blue", "green", "red", "gold", "white", "black")
CLIENTS = ("clinic-a", "clinic-b", "clinic-c")


def make_data(folder: Path, facts: int, seed: int = 0) -> tuple[dict[str, str], list[dict[str, str]]]:
    rng = random.Random(seed)
    places = rng.sample(PLACES, min(facts * len(CLIENTS), len(PLACES)))
    clients, held_out = {}, []
    for i, name in enumerate(CLIENTS):
        own = places[i::len(CLIENTS)]
        colours = {p: rng.choice(COLOURS) for p in own}
        rows = [{"prompt": f"What colour is the {p}ford flag?", "completion": f"The {p}ford flag is {c}."}
                for p, c in colours.items()]
        held_out += [{"prompt": f"Which colour is the flag of {p}ford?", "completion": f"The {p}ford flag is {c}."}
                     for p, c in colours.items()]
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        clients[name] = str(path)
    return clients, held_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--facts", type=int, default=8, help="facts per client")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=3e-2)
    parser.add_argument("--float32", action="store_true", help="train every variant on a float32 base (fedex needs it)")
    parser.add_argument("--variants", help="comma-separated: fedavg, ffa, fedex, int8, nf4, hetlora or a strategy name "
                                           "with its Flower options, e.g. fedadam:eta=0.01;tau=0.001")
    parser.add_argument("--preference", action="store_true", help="federated DPO vs each owner's local DPO")
    parser.add_argument("--reference", default="start", help="--preference: comma-separated preference_reference "
                                                             "values to run (start, round)")
    parser.add_argument("--round-cost", action="store_true", help="per-round client cost: fresh ClientApp processes "
                                                                  "vs warm_clients=True (federated runs only)")
    parser.add_argument("--repeats", type=int, default=1, help="--round-cost: runs per side, alternating which side "
                                                               "goes first; medians reported")
    args = parser.parse_args()
    if args.round_cost:
        compare_round_cost(args)
        return
    if args.variants:
        compare_variants(args)
        return
    if args.preference:
        compare_preference(args)
        return

    import finetune_sdk
    from finetune_sdk import Trainer
    from finetune_sdk.testing.tiny import save_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-federated-"))
    model = save_tiny_model(tmp / "model", hidden_size=args.hidden)
    clients, held_out = make_data(tmp, args.facts)
    train = dict(learning_rate=args.learning_rate, seed=7, per_device_train_batch_size=args.batch, r=8, lora_dropout=0.0)
    steps = args.rounds * args.local_steps * len(CLIENTS)
    examples = steps * args.batch

    started = time.perf_counter()
    fed_trainer = Trainer(model, formatter="chatml", output_dir=tmp / "federated", progress=False, **train)
    fed = fed_trainer.fit_federated(clients, rounds=args.rounds, local_steps=args.local_steps, fraction_evaluate=0)
    fed_time = time.perf_counter() - started
    fed_loss = finetune_sdk.load(fed.output_dir).evaluate(held_out)["eval_loss"]

    union = tmp / "union.jsonl"
    union.write_text("".join(Path(p).read_text(encoding="utf-8") for p in clients.values()), encoding="utf-8")
    started = time.perf_counter()
    central = Trainer(model, formatter="chatml", output_dir=tmp / "central", progress=False, max_steps=steps,
                      save_steps=0, **train)
    central.fit(str(union))
    central_time = time.perf_counter() - started
    central_loss = central.evaluate(held_out)["eval_loss"]
    base_loss = Trainer(model, formatter="chatml", progress=False, **train).evaluate(held_out)["eval_loss"]
    data_bytes = sum(Path(p).stat().st_size for p in clients.values())

    print(f"{len(CLIENTS)} clients x {args.facts} facts, hidden {args.hidden}, LoRA r=8, batch {args.batch}, "
          f"{examples} examples seen by each side (load average {os.getloadavg()[0]:.1f})")
    print("| run | held-out loss | wall time | bytes moved |")
    print("| --- | --- | --- | --- |")
    print(f"| base model | {base_loss:.3f} | - | - |")
    print(f"| centralised (data pooled, {steps} steps) | {central_loss:.3f} | {central_time:.1f} s | "
          f"{data_bytes:,} (data uploaded) |")
    print(f"| federated FedAvg ({args.rounds} rounds x {args.local_steps} local steps) | {fed_loss:.3f} | "
          f"{fed_time:.1f} s | {fed.metrics['bytes_total']:,} (adapter, both ways) |")
    costs = [c for entry in fed.manifest["federated"]["history"] for c in entry["clients"].values()]
    mean = {key: sum(c.get(key, 0.0) for c in costs) / len(costs)
            for key in ("startup_seconds", "load_seconds", "train_seconds")}
    print(f"per client per round (mean of {len(costs)}): ClientApp process start-up {mean['startup_seconds']:.1f} s, "
          f"model load and adapter preparation {mean['load_seconds']:.1f} s, local training "
          f"{mean['train_seconds']:.1f} s; rounds took {[e['seconds'] for e in fed.manifest['federated']['history']]} s")


def preference_data(folder: Path, facts: int, seed: int = 0) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Each owner's private (prompt, chosen, rejected) pairs and the union of held-out pairs."""
    rng = random.Random(seed)
    places = rng.sample(PLACES, min(facts * len(CLIENTS), len(PLACES)))
    clients, held_out = {}, []
    for i, name in enumerate(CLIENTS):
        rows = []
        for place in places[i::len(CLIENTS)]:
            right, wrong = rng.sample(COLOURS, 2)
            rows.append({"prompt": f"What colour is the {place}ford flag?", "chosen": f"The {place}ford flag is {right}.",
                         "rejected": f"The {place}ford flag is {wrong}."})
            held_out.append({"prompt": f"Which colour is the flag of {place}ford?",
                             "chosen": rows[-1]["chosen"], "rejected": rows[-1]["rejected"]})
        path = folder / f"{name}-pairs.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        clients[name] = str(path)
    return clients, held_out


def preference_accuracy(model_dir: Path, held_out: list[dict[str, str]], options: dict) -> float:
    """Share of held-out pairs whose implicit DPO reward margin against the base model (the adapter disabled) is
    positive."""
    import finetune_sdk
    from finetune_sdk.data.rows import load_rows
    from finetune_sdk.plugin_manager import get_plugin_host
    from finetune_sdk.objectives.dpo_training import each_sequence_logps
    from finetune_sdk.data.pairs import encode_preference

    tuned = finetune_sdk.load(model_dir)
    formatter = get_plugin_host().create("formatter", "preference")
    encoded = encode_preference(load_rows(held_out, name="held-out pairs"), formatter, tuned.tokenizer,
                                {"max_length": 256, **options})
    sequences = [ex[side] for ex in encoded.examples for side in ("chosen", "rejected")]
    policy = each_sequence_logps(tuned.model, sequences)
    with tuned.model.disable_adapter():
        reference = each_sequence_logps(tuned.model, sequences)
    margins = [(policy[2 * i] - reference[2 * i]) - (policy[2 * i + 1] - reference[2 * i + 1])
               for i in range(len(encoded.examples))]
    return sum(m > 1e-6 for m in margins) / len(margins)


def lora_options(args: argparse.Namespace) -> dict:
    """The training options every variant of a comparison shares (LoRA r=8, seed 7, the command's lr and batch)."""
    return dict(learning_rate=args.learning_rate, seed=7, per_device_train_batch_size=args.batch, r=8,
                lora_alpha=16, lora_dropout=0.0, **({"dtype": "float32"} if args.float32 else {}))


def compare_preference(args: argparse.Namespace) -> None:
    """Federated DPO (in-process rounds) vs each owner's local-only DPO, by held-out preference accuracy."""
    from finetune_sdk import Trainer
    from finetune_sdk.federated.job import FederatedJob
    from finetune_sdk.federated.settings import FederatedSettings
    from finetune_sdk.testing.federated import run_in_process
    from finetune_sdk.testing.tiny import save_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-federated-dpo-"))
    model = save_tiny_model(tmp / "model", hidden_size=args.hidden)
    clients, held_out = preference_data(tmp, args.facts)
    options = lora_options(args)
    print(f"DPO: {len(CLIENTS)} owners x {args.facts} private pairs, {len(held_out)} held-out pairs, hidden "
          f"{args.hidden}, LoRA r=8, lr {args.learning_rate}, {args.rounds} rounds x {args.local_steps} local steps "
          f"(load average {os.getloadavg()[0]:.1f})")
    print("| adapter | held-out preference accuracy | seconds |")
    print("| --- | --- | --- |")
    for reference in args.reference.split(","):
        started = time.perf_counter()
        job = FederatedJob(str(model), "lora", None, "preference", dict(options),
                           FederatedSettings(rounds=args.rounds, local_steps=args.local_steps, fraction_evaluate=0,
                                             min_fit_clients=len(CLIENTS), preference_reference=reference
                                             ).validate(len(CLIENTS)),
                           str(tmp / f"federated-{reference}"), expected_clients=sorted(CLIENTS), run_token="dpo")
        run_in_process(job, {name: (path, None) for name, path in clients.items()})
        accuracy = preference_accuracy(tmp / f"federated-{reference}", held_out, options)
        print(f"| federated DPO (FedAvg, {args.rounds} rounds, reference: {reference}) | {accuracy:.3f} | "
              f"{time.perf_counter() - started:.0f} |", flush=True)
    for name, path in clients.items():
        started = time.perf_counter()
        Trainer(model, formatter="preference", output_dir=tmp / name, progress=False, save_steps=0,
                max_steps=args.rounds * args.local_steps, **options).fit(path)
        accuracy = preference_accuracy(tmp / name, held_out, options)
        print(f"| {name} local-only DPO ({args.rounds * args.local_steps} steps) | {accuracy:.3f} | "
              f"{time.perf_counter() - started:.0f} |", flush=True)


def compare_variants(args: argparse.Namespace) -> None:
    """Held-out loss, traffic and LoRA aggregation error of each variant on the same 3 owners (in-process rounds)."""
    import finetune_sdk
    from finetune_sdk import Trainer
    from finetune_sdk.federated.job import FederatedJob
    from finetune_sdk.federated.settings import FederatedSettings
    from finetune_sdk.testing.federated import run_in_process
    from finetune_sdk.testing.tiny import save_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-federated-"))
    model = save_tiny_model(tmp / "model", hidden_size=args.hidden)
    clients, held_out = make_data(tmp, args.facts)
    options = lora_options(args)
    base = Trainer(model, formatter="chatml", progress=False, **options).evaluate(held_out)["eval_loss"]
    print(f"{len(CLIENTS)} owners x {args.facts} facts, hidden {args.hidden}, LoRA r=8, lr {args.learning_rate}, "
          f"{args.rounds} rounds x {args.local_steps} local steps, base held-out loss {base:.3f} "
          f"(load average {os.getloadavg()[0]:.1f})")
    print("| variant | held-out loss | bytes moved | max aggregation error | seconds |")
    print("| --- | --- | --- | --- | --- |")
    for variant in args.variants.split(","):
        settings: dict[str, object] = {"rounds": args.rounds, "local_steps": args.local_steps,
                                       "fraction_evaluate": 0, "min_fit_clients": len(CLIENTS)}
        ranks = {}
        if variant in ("fedavg", "ffa", "fedex"):
            settings["aggregation"] = variant
        elif variant in ("int8", "nf4"):
            settings["update_compression"] = variant
        elif variant == "hetlora":  # clinic-c trains rank 4 of the rank-8 global adapter
            ranks = {"clinic-c": 4}
        else:  # a strategy, with Flower's options as name:key=value,key=value
            name, _, given = variant.partition(":")
            settings["strategy"] = name
            settings["strategy_options"] = {k: float(v) for k, v in (o.split("=") for o in given.split(";") if o)}
        job = FederatedJob(str(model), "lora", None, "chatml", dict(options),
                           FederatedSettings(**settings).validate(len(CLIENTS)), str(tmp / variant),
                           expected_clients=sorted(CLIENTS), run_token=variant)
        started = time.perf_counter()
        manifest = run_in_process(job, {name: (path, None, ranks.get(name)) for name, path in clients.items()})
        seconds = time.perf_counter() - started
        loss = finetune_sdk.load(tmp / variant).evaluate(held_out)["eval_loss"]
        error = manifest["metrics"].get("aggregation_error_max")
        print(f"| {variant} | {loss:.3f} | {manifest['metrics']['bytes_total']:,} | "
              f"{'-' if error is None else f'{error:.2e}'} | {seconds:.0f} |", flush=True)



def compare_round_cost(args: argparse.Namespace) -> None:
    """The same federated run with Flower's fresh ClientApp process per message (``warm_clients=False``) and with
    the default ``warm_clients=True``: each client's start-up (process start, or task acquisition, to the handler)
    and load (Trainer, model, adapter) seconds per round, round 1 and the later rounds apart (a warm client's first
    round still imports and loads). With ``--repeats N`` each side runs N times, alternating which goes first;
    the table gives medians over the runs of the per-run client means."""
    import statistics

    from finetune_sdk import Trainer
    from finetune_sdk.testing.tiny import save_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-federated-cost-"))
    model = save_tiny_model(tmp / "model", hidden_size=args.hidden)
    clients, _ = make_data(tmp, args.facts)
    train = dict(learning_rate=args.learning_rate, seed=7, per_device_train_batch_size=args.batch, r=8, lora_dropout=0.0)
    print(f"{len(CLIENTS)} clients, {args.rounds} rounds x {args.local_steps} local steps, hidden {args.hidden}, "
          f"{args.repeats} run(s) per side, alternating (load average before {os.getloadavg()[0]:.1f})", flush=True)
    rows: dict[tuple[bool, str], list[dict[str, float]]] = {}
    for repeat in range(args.repeats):
        for warm in ((False, True) if repeat % 2 == 0 else (True, False)):
            started = time.perf_counter()
            fed = Trainer(model, formatter="chatml", output_dir=tmp / f"fed-{warm}-{repeat}", progress=False,
                          **train).fit_federated(clients, rounds=args.rounds, local_steps=args.local_steps,
                                                 fraction_evaluate=0, warm_clients=warm)
            wall = time.perf_counter() - started
            history = fed.manifest["federated"]["history"]
            for label, entries in (("1", history[:1]), (f"2-{len(history)}", history[1:])):
                costs = [c for entry in entries for c in entry["clients"].values()]
                if costs:
                    mean = {key: sum(c.get(key, 0.0) for c in costs) / len(costs)
                            for key in ("startup_seconds", "load_seconds", "train_seconds")}
                    rows.setdefault((warm, label), []).append({**mean, "wall": wall})
            print(f"run {repeat + 1} {'warm' if warm else 'fresh'}: {wall:.1f} s", flush=True)
    print("| clients | round | start-up s | load s | start-up + load s | train s | run wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (warm, label), runs in rows.items():
        med = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(f"| {'warm (default)' if warm else 'fresh process (warm_clients=False)'} | {label} | "
              f"{med['startup_seconds']:.2f} | {med['load_seconds']:.2f} | "
              f"{statistics.median(r['startup_seconds'] + r['load_seconds'] for r in runs):.2f} | "
              f"{med['train_seconds']:.2f} | {med['wall']:.1f} |")
    print(f"load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
