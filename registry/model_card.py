"""The README.md model card written with every pushed version."""

from __future__ import annotations

import json
from typing import Any

from finetune_sdk.registry.local import AdapterVersion
from finetune_sdk.registry.scores import model_index

PIPELINE = {"causal-lm": "text-generation", "classification": "text-classification",
            "reward": "text-classification"}
#: How each task's model is used, after ``model = finetune_sdk.load(...)``.
USAGE = {"classification": 'model.predict(["Hello!"])', "reward": 'model.score(["Hello!"], ["Hi, how can I help?"])'}


def _yaml_list(items: list[str]) -> str:
    return "".join(f"\n- {json.dumps(item)}" for item in items)


def model_card(version: AdapterVersion, repo_id: str, artifacts: dict[str, dict[str, Any]] | None = None,
               scores: list[dict[str, Any]] | None = None) -> str:
    """YAML metadata (``library_name: peft``, ``base_model``, tags, pipeline tag, ``model-index`` with the version's
    benchmark scores) and a body that says how it was trained and how to load it, its scores, and a table of the
    version's artifacts (GGUF exports with their quantization). Credentials never appear: manifests hold none."""
    m = version.manifest
    base = m.get("base_model") or {}
    technique = m.get("technique") or "unknown"
    tags = ["finetune-sdk", technique] + (["peft", "lora"] if technique in ("lora", "qlora") else [])
    if m.get("quantizer"):
        tags.append(m["quantizer"])
    if any(a.get("kind") == "gguf" for a in (artifacts or {}).values()):
        tags.append("gguf")
    header = ["---", "library_name: peft" if technique in ("lora", "qlora") else "library_name: transformers"]
    if base.get("kind") == "hub":
        header.append(f"base_model: {json.dumps(base['id'])}")
    header += [f"tags:{_yaml_list(tags)}", f"pipeline_tag: {PIPELINE.get(m.get('task'), 'text-generation')}"]
    index = model_index(version.name, scores or [])
    if index:  # JSON is YAML: the Hub reads this block as the card's evaluation results
        header.append(f"model-index: {json.dumps(index, sort_keys=True)}")
    header.append("---")
    options = m.get("options") or {}
    metrics = m.get("metrics") or {}
    dataset = m.get("dataset") or {}
    lines = [
        *header, "", f"# {version.name} v{version.version}", "",
        version.description or "A fine-tuning result published with finetune-sdk.", "",
        "| | |", "| --- | --- |",
        f"| technique | `{technique}` |", f"| quantizer | `{m.get('quantizer')}` |",
        f"| formatter | `{m.get('formatter')}` |",
        f"| base model | `{base.get('id')}` (revision `{base.get('revision')}`) |",
        f"| dataset | {dataset.get('rows')} rows, fingerprint `{dataset.get('fingerprint')}` |",
        f"| parent | `{version.parent}` |", f"| created | {version.created} |", "",
        "## Options", "", "| option | value |", "| --- | --- |",
        *[f"| {k} | `{json.dumps(v)}` |" for k, v in sorted(options.items())], "",
        "## Metrics", "", "| metric | value |", "| --- | --- |",
        *[f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items())], "",
        "## Use", "", "With finetune-sdk:", "", "```python", "import finetune_sdk", "",
        f'model = finetune_sdk.load("hf://{repo_id}@v{version.version}")',
        USAGE.get(m.get("task") or "", 'model.generate(["Hello!"])'),
        "```", "",
    ]
    if scores:
        lines += ["## Benchmark scores", "", "| task | metric | shots | limit | value | stderr | lm-eval |",
                  "| --- | --- | --- | --- | --- | --- | --- |",
                  *[f"| {r['task']} | {r['metric']} | {r['num_fewshot']} | {r['limit']} | {r['value']:.4g} | "
                    f"{r['stderr'] if r.get('stderr') is None else format(r['stderr'], '.4g')} | "
                    f"{r['lm_eval_version']} |" for r in scores], ""]
    if artifacts:
        lines += ["## Exported files", "", "| file | kind | quantization | size |", "| --- | --- | --- | --- |",
                  *[f"| `artifacts/{name}` | {a.get('kind')} | `{(a.get('metadata') or {}).get('quantization')}` | "
                    f"{a.get('size', 0) / 2**20:.1f} MiB |" for name, a in sorted(artifacts.items())], ""]
        if any(a.get("kind") == "gguf" for a in artifacts.values()):
            lines += ["The GGUF files run with llama.cpp (`llama-cli -m FILE`), LM Studio, or Ollama (download the "
                      "file and its `Modelfile`, then `ollama create NAME -f Modelfile`).", ""]
    if technique in ("lora", "qlora"):
        lines += ["With plain PEFT (the adapter's own revision is the tag; the base model's revision is in "
                  "adapter_config.json):", "", "```python", "from peft import AutoPeftModelForCausalLM", "",
                  f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}", revision="v{version.version}")',
                  "```", ""]
    return "\n".join(lines)
