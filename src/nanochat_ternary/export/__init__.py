"""Export a checkpoint: GGUF (llama.cpp), a Hugging Face directory, or our packed file.

One module per format (``gguf``, ``hf``, ``packed``); ``common`` turns a checkpoint into ternary
codes + scales with the model's own quantizer and writes outputs atomically.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from .common import ExportError, atomic_output, check_not_overlapping, file_size, load_checkpoint

FORMATS = ("gguf", "hf", "packed")


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path, quant: str | None = None,
                      force: bool = False, log: Callable[[str], None] = print) -> dict:
    """Export ``checkpoint`` (a run dir or step dir) to ``out`` in ``fmt``; returns a summary dict.

    Nothing is left at ``out`` unless the export completes: it is written beside it and renamed.
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: unknown (formats: {', '.join(FORMATS)})")
    if quant is not None and fmt != "gguf":
        raise ExportError(f"--quant applies to --format gguf only ({fmt} has one layout)")
    out = Path(out)
    t0 = time.time()
    ck = load_checkpoint(checkpoint)  # NaN/inf weights are refused here (checkpoint/files.py)
    check_not_overlapping(out, ck.path)
    m = ck.config.model
    picked = ""
    if fmt == "gguf" and quant is None:
        from .gguf import exact_quant

        quant, why = exact_quant(ck)  # the most compact type that holds this model's weights exactly
        picked = f" (no --quant given: {why})"
    log(f"export {ck.path} (step {ck.step}, {m.n_layers} layers, dim {m.dim}, heads {m.n_heads}/{m.n_kv_heads}, "
        f"vocab {m.vocab_size}, {'tied' if m.weight_tied else 'untied'} head, group_size {m.group_size}) "
        f"-> {fmt}{' ' + quant if fmt == 'gguf' else ''}{picked}")
    for what in ck.dropped:
        log(f"  note: dropping {what}")
    if m.act_quant != "int8" and fmt != "packed":
        engine = ("llama.cpp quantizes activations to 8 bits" if fmt == "gguf"
                  else "transformers runs them in full precision")
        log(f"  note: the model trained with act_quant = {m.act_quant!r} activations; {engine} (more precise than "
            f"training, so logits differ slightly); --format packed keeps {m.act_quant!r}")
    if fmt == "gguf":
        from .gguf import QUANTS, write_gguf

        if quant not in QUANTS:  # before any work: no temp file for a typo
            raise ExportError(f"--quant {quant}: unknown (gguf takes {', '.join(QUANTS)})")
        with atomic_output(out, force) as tmp:
            summary = write_gguf(ck, tmp, quant, log=log)
    elif fmt == "packed":
        from .packed import write_packed

        with atomic_output(out, force) as tmp:
            summary = write_packed(ck, tmp, log=log)
    else:
        from .hf import write_hf

        with atomic_output(out, force, is_dir=True) as tmp:
            summary = write_hf(ck, tmp, log=log)
    summary.update(out=str(out), bytes=file_size(out), seconds=time.time() - t0, checkpoint=str(ck.path))
    log(f"wrote {out}: {summary['bytes'] / 2**20:.2f} MiB in {summary['seconds']:.1f} s")
    return summary


__all__ = ["FORMATS", "ExportError", "export_checkpoint", "load_checkpoint"]
