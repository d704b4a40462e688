"""Judge a model: bits per byte on any text, multiple-choice tasks, HumanEval pass@k (docs/evaluation.md)."""
