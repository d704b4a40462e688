"""``torch.compile`` for training: when it is on, what it compiles, and how a failure is reported.

What pays (measured, docs/gpu.md): each transformer block, compiled once and reused by every block
(they share one graph: the parameters are graph inputs), so the ternary quantizers, RMSNorm, RoPE
and SwiGLU's elementwise work fuse into a few kernels around the matmuls; and the loss head's
per-chunk softmax (model/linear_ce.py). The embedding, the final norm and the optimizers stay eager.

``compile = "auto"`` compiles on CUDA only. On CPU the inductor backend works (it needs a C++
compiler) and speeds up long runs, but its first step costs tens of seconds, more than the default
3-minute CPU job gains; ``compile = true`` asks for it anyway.

Compiled graphs are only used for training (grad enabled, no KV cache): evaluation and generation
run the same modules eagerly, so no second graph is compiled for them. A compile failure is an error
that names ``--set compile=false``, never a silent fallback to eager: graphs are compiled with
``fullgraph=True`` (no graph breaks) and dynamo is told to fail instead of falling back when its
recompile limit is hit.
"""

from __future__ import annotations

import torch

COMPILE_SETTINGS = ("auto", "true", "false")


def compile_enabled(setting: str, device: torch.device) -> bool:
    """Whether training compiles: ``"auto"`` on CUDA only, ``"true"`` / ``"false"`` as said."""
    if setting not in COMPILE_SETTINGS:
        raise ValueError(f"compile must be one of {COMPILE_SETTINGS}, got {setting!r}")
    return setting == "true" or (setting == "auto" and device.type == "cuda")


def configure_dynamo() -> None:
    """Fail loudly rather than run eagerly when dynamo would give up on a graph."""
    import torch._dynamo.config as dynamo_config

    if hasattr(dynamo_config, "fail_on_cache_limit_hit"):
        dynamo_config.fail_on_cache_limit_hit = True
    dynamo_config.suppress_errors = False


def compile_module(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` compiled for training: static shapes, one whole graph (graph breaks are errors)."""
    return torch.compile(module, dynamic=False, fullgraph=True)


def is_compile_error(e: BaseException) -> bool:
    """Whether ``e`` came out of torch.compile (dynamo tracing, AOT autograd, inductor codegen or
    its C++/Triton compile) rather than from the model's own code."""
    kinds: list[type] = []
    try:
        import torch._dynamo.exc as dynamo_exc

        kinds.append(dynamo_exc.TorchDynamoException)
    except ImportError:  # pragma: no cover - every supported torch has it
        pass
    try:
        import torch._inductor.exc as inductor_exc

        kinds += [getattr(inductor_exc, n) for n in ("InductorError", "CppCompileError") if hasattr(inductor_exc, n)]
    except ImportError:  # pragma: no cover
        pass
    return isinstance(e, tuple(kinds)) if kinds else False


def compile_error_line(e: BaseException) -> str:
    """One line for a compile failure: what failed, and the way around it."""
    cause = getattr(e, "inner_exception", None) or e.__cause__ or e  # the backend's own error, if wrapped
    text = str(cause).strip()
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if len(first) > 240:
        first = first[:237] + "..."
    what = f"{type(cause).__name__}: {first}" if first else type(cause).__name__
    return (f"torch.compile failed ({type(e).__name__} from {what}); train without it with "
            f"--set compile=false (slower, same results)")
