"""What this package's optimizers share (as torchao's low-bit optimizers share one base).

* a parameter index: each parameter's position in the flattened parameter list, built once (it keys
  the seeded random streams of stochastic rounding and GaLore's sketches, so resume and every rank
  draw the same numbers) instead of a linear scan per parameter per step;
* ``load_state_dict`` that keeps every saved state tensor's dtype (int8 codes, bf16 moments, fp32
  momentum of a bf16 parameter): ``torch.optim.Optimizer`` casts floating state to the parameter's
  dtype, which would round or reinterpret them; then a per-variant check of what was loaded;
* the step preamble (the closure).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class StatefulOptimizer(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` plus the parameter index and a dtype-keeping ``load_state_dict``."""

    def _build_index(self) -> None:
        self._index_of = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    def _param_index(self, p: Tensor) -> int:
        """Position of ``p`` in the flattened parameter list: the key of its random streams."""
        try:
            return self._index_of[id(p)]
        except (AttributeError, KeyError):
            raise KeyError(f"{type(self).__name__}: parameter of shape {tuple(p.shape)} is not in this "
                           f"optimizer") from None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._build_index()

    @staticmethod
    def _run_closure(closure: Callable[[], Any] | None) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _check_loaded_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Refuse a loaded state this variant cannot use (override); the base accepts any."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``Optimizer.load_state_dict``, but every state tensor keeps its saved dtype and moves to its
        parameter's device; then :meth:`_check_loaded_state` per parameter with state."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        owner = {id(p): g for g in self.param_groups for p in g["params"]}
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(i, {}).items():
                if isinstance(value, Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)
            if p in self.state and self.state[p]:
                self._check_loaded_state(p, self.state[p], owner[id(p)])
