"""Error feedback: per-parameter residuals that carry each rank's compression error forward.

EF-SGD (Karimireddy et al. 2019, arXiv 1901.09847; GRACE's residual memory): a rank sends
C(x) for x = g + e and keeps e <- x - C(x), so what it failed to send this step is sent
later: after T steps, (everything sent) + e_T = (every gradient), exactly. The residual stays
bounded when C is contractive, E||x - C(x)||^2 <= (1 - delta) ||x||^2. An unbiased quantizer
Q with E||Q(x) - x||^2 <= omega ||x||^2 is not when omega >= 1 (2-bit L2-scaled codes: omega
~ sqrt(bucket size)); C = gamma Q with gamma = 1 / (1 + omega) is, with delta = gamma
(Stich & Karimireddy 2020, arXiv 1909.05350, the scaled unbiased compressor). `gamma_for`
picks that gamma from the scheme's proven bound; 1 where the bound is below 1 or unknown.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import bounds
from .backends import backend_for


def gamma_for(scheme: Any, error_feedback: bool | float) -> float:
    """The scale gamma of what error feedback sends (see module doc); a float is taken as is."""
    if isinstance(error_feedback, bool):
        omega = bounds.relative_variance(scheme)
        return 1.0 / (1.0 + omega) if omega is not None and omega >= 1 else 1.0
    if not isinstance(error_feedback, (int, float)) or not 0 < error_feedback <= 1:
        raise ValueError(f"error_feedback must be False, True (gamma from the scheme's variance "
                         f"bound) or a float gamma in (0, 1], got {error_feedback!r}")
    return float(error_feedback)


class ErrorFeedback:
    """Residuals keyed by parameter name, held in each gradient's own dtype and device (torch
    and NumPy arrays; TF variables, so that graphs carry them from run to run)."""

    def __init__(self, gamma: float = 1.0) -> None:
        self.gamma = gamma
        self._slots: dict[str, Any] = {}
        self._loaded: dict[str, np.ndarray] = {}

    def compensate(self, key: str, grad: Any) -> Any:
        """g + e for this parameter (e = 0 the first time). Reads only: `keep` updates."""
        slot = self._slot(key, grad)
        return grad + slot.xp.read_state(slot)

    def keep(self, key: str, compensated: Any, sent: Any) -> None:
        """e <- x - gamma * Q(x), where `sent` = Q(x) is this rank's own decoded contribution."""
        xp = backend_for(compensated)
        sent = xp.cast(sent, xp.dtype_name(compensated))
        self._slots[key].xp.write_state(self._slots[key], compensated - (sent * self.gamma if self.gamma != 1 else sent))

    def residual(self, key: str) -> Any:
        """This parameter's residual, or None before its first step."""
        slot = self._slots.get(key)
        return None if slot is None else slot.xp.read_state(slot)

    def reset(self) -> None:
        """Forget every residual (e.g. after loading weights trained elsewhere)."""
        self._slots.clear()
        self._loaded.clear()

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every residual as a host array, keyed by parameter name."""
        out = {k: np.array(v) for k, v in self._loaded.items()}
        for key, slot in self._slots.items():
            out[key] = np.array(slot.xp.to_numpy(slot.xp.read_state(slot)))
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore residuals saved by `state_dict`; each moves to its gradient's dtype and
        device on that parameter's next step."""
        self.reset()
        self._loaded = {str(k): np.asarray(v.detach().cpu() if hasattr(v, "detach") else v)
                        for k, v in state.items()}

    def _slot(self, key: str, grad: Any) -> Any:
        xp = backend_for(grad)
        slot = self._slots.get(key)
        if slot is None:
            init = self._loaded.pop(key, None)
            if init is not None and tuple(init.shape) != xp.shape(grad):
                raise ValueError(f"error feedback: the saved residual of {key!r} has shape "
                                 f"{tuple(init.shape)}, the gradient {xp.shape(grad)}; load the "
                                 "state saved for this model")
            slot = self._slots[key] = xp.new_state(grad, init)
        elif slot.xp.state_shape(slot) != xp.shape(grad):
            raise ValueError(f"error feedback: the gradient of {key!r} changed shape from "
                             f"{slot.xp.state_shape(slot)} to {xp.shape(grad)}; give each parameter "
                             "its own name, or call reset()")
        return slot
