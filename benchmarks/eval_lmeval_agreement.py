"""Our eval vs lm-eval-harness on our HF export, same model, same items (docs/evaluation.md).

Writes the first ``--limit`` items of the built-in ``stdlib-next-line`` task (as this checkpoint
sees them) to a JSONL + an lm-eval task YAML (``target_delimiter: ""``: a choice is the whole next
line), exports the checkpoint with ``export --format hf``, runs ``lm_eval --model hf`` offline and
``nanochat-train eval`` on that YAML, and prints both accuracies. For a ternary checkpoint they
differ by what the int8 activations change: our forward quantizes every BitLinear input to int8
per token, the exported LlamaForCausalLM runs dequantized ternary weights on unquantized inputs.

    python benchmarks/eval_lmeval_agreement.py --checkpoint runs/X --out /tmp/agree --limit 100
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import kit  # benchmarks/kit.py: provenance

from nanochat_ternary.checkpoint import open_checkpoint
from nanochat_ternary.cli import main as cli
from nanochat_ternary.eval.tasks import builtin_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True, help="a new dir for the task, the export and both results")
    ap.add_argument("--limit", type=int, default=100)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    opened = open_checkpoint(args.checkpoint)
    task = builtin_task("stdlib-next-line", args.limit, opened)
    with open(out / "items.jsonl", "w") as f:
        for it in task.items:
            f.write(json.dumps({"query": it.context, "choices": it.continuations, "gold": it.gold}) + "\n")
    (out / "nextline.yaml").write_text(
        f"task: nextline\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {out / 'items.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: query\ndoc_to_choice: choices\n"
        "doc_to_target: gold\ntarget_delimiter: \"\"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    assert cli(["export", "--checkpoint", args.checkpoint, "--format", "hf", "--out", str(out / "hf")]) == 0
    assert cli(["eval", "--checkpoint", args.checkpoint, "--tasks", str(out / "nextline.yaml"), "--json",
                str(out / "ours.json"), "--no-progress", "--threads", "1"]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                    f"pretrained={out / 'hf'},dtype=float32", "--tasks", "nextline", "--include_path", str(out),
                    "--device", "cpu", "--batch_size", "8", "--output_path", str(out / "lm")], env=env, check=True)
    theirs = json.loads(open(glob.glob(str(out / "lm" / "*" / "results_*.json"))[0]).read())["results"]["nextline"]
    ours = {r["metric"]: r for r in json.loads((out / "ours.json").read_text())["results"]}
    kit.header("eval_lmeval_agreement", checkpoint=args.checkpoint, limit=args.limit)
    print(f"{opened.name} ({opened.config.model.quantization}), {len(task.items)} stdlib-next-line items")
    for m in ("acc", "acc_norm"):
        print(f"{m:<9} ours (int8 activations) {ours[m]['value']:.4f}   lm-eval on HF export {theirs[m + ',none']:.4f}")


if __name__ == "__main__":
    main()
