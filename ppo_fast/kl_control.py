"""KL coefficient controllers (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences", section 2.2)."""

from __future__ import annotations

import math

from ._checks import non_negative, positive


class FixedKLController:
    """A constant β."""

    def __init__(self, kl_coef: float):
        non_negative("kl_coef", kl_coef)
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """β_{t+1} = β_t · (1 + clip(KL_t / target − 1, ±0.2) · n_steps / horizon).

    ``current_kl`` is the measured KL per sequence (or per token, as long as ``target`` is in the
    same unit); ``n_steps`` the number of samples (or steps) since the last update.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        positive("init_kl_coef", init_kl_coef)
        positive("target", target)
        positive("horizon", horizon)
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl must be finite, got {current_kl!r}")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = (float(state[k]) for k in ("value", "target", "horizon"))
