"""KL coefficient controllers (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences", section 2.2)."""

from __future__ import annotations

import math

from .arguments import non_negative, positive


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

    That update integrates the error in log β: alone it reacts to an overshoot only as fast as
    the horizon lets β grow, and KL keeps rising meanwhile (twice the target on the trainer's
    default run). Two options make it a PI controller that holds the target:

    * ``proportional`` = k > 0: the β in use is ``β_I · exp(k · clip(KL_t / target − 1, ±1))``,
      where β_I follows the update above. A KL at twice the target multiplies β by e^k at once;
      back at the target the factor is 1 again, so it damps without moving the equilibrium.
    * ``hold_until_target``: β_I keeps its initial value until the KL first reaches the target.
      A run's KL starts at 0 and rises as fast as the policy learns; lowering β meanwhile only
      winds the integral down (β had fallen 5x by the time the default run reached its target),
      and the overshoot that follows takes many steps to undo.

    With both off (the defaults) it is the controller of Ziegler et al. and of TRL and OpenRLHF.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float, *, proportional: float = 0.0,
                 hold_until_target: bool = False):
        positive("init_kl_coef", init_kl_coef)
        positive("target", target)
        positive("horizon", horizon)
        non_negative("proportional", proportional)
        if not isinstance(hold_until_target, bool):
            raise ValueError(f"hold_until_target must be a bool, got {hold_until_target!r}")
        self.value = self.integral = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)
        self.proportional = float(proportional)
        self.hold_until_target = hold_until_target
        self.reached_target = False

    def update(self, current_kl: float, n_steps: int) -> float:
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl must be finite, got {current_kl!r}")
        self.reached_target = self.reached_target or current_kl >= self.target
        relative = current_kl / self.target - 1.0
        if self.reached_target or not self.hold_until_target:
            self.integral *= 1.0 + min(max(relative, -0.2), 0.2) * n_steps / self.horizon
        self.value = self.integral * math.exp(self.proportional * min(max(relative, -1.0), 1.0))
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon, "integral": self.integral,
                "proportional": self.proportional, "hold_until_target": self.hold_until_target,
                "reached_target": self.reached_target}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = (float(state[k]) for k in ("value", "target", "horizon"))
        # A state saved before the PI options existed is the plain controller's: β_I is β.
        self.integral = float(state.get("integral", self.value))
        self.proportional = float(state.get("proportional", 0.0))
        self.hold_until_target = bool(state.get("hold_until_target", False))
        self.reached_target = bool(state.get("reached_target", False))
