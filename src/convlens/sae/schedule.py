"""What changes over an SAE's training besides its weights: the learning rate, the weight of the sparsity penalty
(a warm-up, and with a target L0 a controller), and the resampling of dead latents. Shared by ``train-sae`` and
``sweep``; every value is a function of the step and of state saved in the checkpoint, so a resumed run continues
exactly.

- Learning rate: linear warm-up over the first ``lr_warmup`` share of the steps, constant, then linear decay to 0
  over the last ``lr_decay`` share (Conerly et al. 2024, "Circuits Updates - April 2024": decay over the last 20 %).
- Penalty warm-up: the sparsity penalty's weight rises linearly from 0 over the first ``penalty_warmup`` share of
  the steps (same source: the L1 coefficient warmed up over the first 5 %), so latents find directions before the
  penalty prunes them.
- Target L0: for an SAE whose sparsity is a penalty (:attr:`SparseAutoencoder.penalty_term`), the penalty is
  multiplied by ``m``. After the warm-up, every control period (``CONTROL_PERIOD`` of the steps) compares the
  period's mean L0 (active latents per sample) with the target and moves ``log m`` by ``step * clamp(log(L0 /
  target), -1, 1)``; the step grows by half while the error keeps its sign and halves when it flips (the sign rule
  of Rprop, Riedmiller & Braun 1993), and ``m`` stays within ``LOG_MULTIPLIER_RANGE``. The coefficient can so
  travel orders of magnitude when the plugin's start is far off, while the lag between a coefficient and the
  sparsity it causes (the weights follow at the learning rate) does not make it oscillate. It runs on the device:
  no step waits for it.
- Resampling (Bricken et al. 2023, "Towards Monosemanticity", resampling dead neurons): at the shares
  ``resample_at`` of the steps, latents that fired on no sample for the last ``DEAD_WINDOW`` share of the
  steps get new directions: residuals ``x - x^`` of pool rows drawn with probability proportional to their
  squared error (the direction AuxK models for TopK, Gao et al. 2024), and their optimiser state is reset.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from convlens.core.errors import ConvlensError
from convlens.sae.base import SparseAutoencoder

# the controller looks at the L0 of this share of the steps (at least MIN_PERIOD steps). Every 1 %, a JumpReLU on
# a planted dictionary (32 dimensions, 512 atoms, 2 active, 20,480 steps at 3e-4) whose L0 fell below target early,
# with the multiplier wound down to its floor, overshot to 15x the target for a fifth of its steps while the
# multiplier climbed back; every 0.25 % the overshoot is shorter and the atoms are recovered better (MMCS 0.73 -> 0.75
# there, 0.92 -> 0.94 with 64 dimensions and 512 atoms, both at a learning rate of 1e-3)
CONTROL_PERIOD = 0.0025
MIN_PERIOD = 10
FIRST_STEP, MAX_STEP, MIN_STEP = 0.1, 0.25, 0.005  # the controller's step on log m: start, largest, smallest
DEADBAND = 0.02  # |log(L0 / target)| below this counts as on target (no sign)
# the multiplier stays within [1e-3, 1e4] of the plugin's coefficient: below, the penalty no longer shapes training
# while L0 is under target, and a multiplier wound further down would take many periods to come back once L0
# crosses it (an integrator's anti-windup)
LOG_MULTIPLIER_RANGE = (math.log(1e-3), math.log(1e4))
DEAD_WINDOW = 0.05  # a latent is dead for resampling when it fired on no sample for this share of the steps


class TrainingSchedule:
    """The schedule of one SAE under ``params`` (:class:`~convlens.sae.training.SAETrainingParams`) for
    ``total_steps`` steps of ``batch_size`` samples; :meth:`before_step` and :meth:`after_step` frame each step."""

    def __init__(
        self,
        sae: SparseAutoencoder,
        optimizer: torch.optim.Optimizer,
        params: Any,
        total_steps: int,
        device: torch.device,
    ):
        self.sae, self.optimizer, self.params, self.total_steps = sae, optimizer, params, total_steps
        self.controls = params.target_l0 is not None and sae.penalty_term is not None
        self.log_multiplier = torch.zeros((), dtype=torch.float64, device=device)
        self.control_step = torch.full((), FIRST_STEP, dtype=torch.float64, device=device)
        self.last_sign = torch.zeros((), dtype=torch.float64, device=device)
        self.period = max(MIN_PERIOD, round(CONTROL_PERIOD * total_steps))
        self.period_active = torch.zeros((), dtype=torch.float64, device=device)
        self.period_rows = 0
        self.resample_steps = sorted({round(share * total_steps) for share in params.resample_at if share > 0})
        self.resampled: list[dict[str, Any]] = []

    @staticmethod
    def check(sae: SparseAutoencoder, params: Any, name: str) -> None:
        """A target L0 only for an SAE whose sparsity is a penalty (TopK's k is its own target)."""
        if params.target_l0 is not None and sae.penalty_term is None:
            raise ConvlensError(
                f"target_l0 applies to SAEs whose sparsity is a penalty (relu-l1, jumprelu, ...); '{name}' sets its "
                "sparsity structurally: set its k instead"
            )

    # -- per step ----------------------------------------------------------------------------------------------

    def lr_factor(self, step: int, decays: bool = True) -> float:
        """The learning rate's share of ``params.lr`` at step ``step`` (0-based); ``decays`` False: without the
        final decay (a parameter group that asks for it, e.g. thresholds that keep the L0 on target)."""
        warmup = self.params.lr_warmup * self.total_steps
        decay = self.params.lr_decay * self.total_steps if decays else 0
        factor = 1.0
        if warmup > 0 and step < warmup:
            factor = min(1.0, (step + 1) / warmup)
        if decay > 0 and step >= self.total_steps - decay:
            factor = min(factor, (self.total_steps - step) / decay)
        return factor

    def penalty_warmup_factor(self, step: int) -> float:
        warmup = self.params.penalty_warmup * self.total_steps
        return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0

    def before_step(self, step: int) -> None:
        """Set the learning rate, the SAE's training progress and the penalty's weight for the step ``step``
        (0-based) about to run."""
        self.sae.training_progress = step / self.total_steps
        for group in self.optimizer.param_groups:
            factor = self.lr_factor(step, decays=group.get("lr_decay", True))
            group["lr"] = self.params.lr * factor * group.get("lr_scale", 1.0)
        if self.sae.penalty_term is None:
            return
        warm = self.penalty_warmup_factor(step)
        self.sae.penalty_scale = self.log_multiplier.exp().float() * warm if self.controls else warm

    def after_step(self, step: int, active: torch.Tensor, rows: int) -> None:
        """Count the step's active latents ``active`` (a device count) over ``rows`` rows; at the end of a control
        period, update the controller."""
        if not self.controls or step + 1 < self.params.penalty_warmup * self.total_steps:
            return
        self.period_active.add_(active.double())
        self.period_rows += rows
        if (step + 1) % self.period:
            return
        l0 = self.period_active.clamp_min(0.5) / max(self.period_rows, 1)
        error = torch.log(l0 / self.params.target_l0).clamp_(-1.0, 1.0)
        sign = torch.where(error.abs() < DEADBAND, torch.zeros_like(error), error.sign())
        factor = torch.where(sign * self.last_sign > 0, 1.5, torch.where(sign * self.last_sign < 0, 0.5, 1.0))
        self.control_step.mul_(factor).clamp_(MIN_STEP, MAX_STEP)
        self.log_multiplier.add_(self.control_step * error * sign.abs()).clamp_(*LOG_MULTIPLIER_RANGE)
        self.last_sign.copy_(sign)
        self.period_active.zero_()
        self.period_rows = 0

    @property
    def penalty_multiplier(self) -> float:
        """The controller's factor on the penalty (1 without a target); reading it waits for the device."""
        return float(self.log_multiplier.exp())

    # -- resampling --------------------------------------------------------------------------------------------

    def resample_due(self, step: int) -> bool:
        """Whether dead latents are resampled after step ``step`` (1-based: the number of steps done)."""
        return self.sae.supports_resampling and step in self.resample_steps

    @torch.no_grad()
    def resample(self, step: int, pool: torch.Tensor, seed: int) -> int:
        """Resample the latents dead for the last :data:`DEAD_WINDOW` share of the steps from ``pool`` (raw rows);
        returns how many (the caller's rows are the same on every rank, so every rank does the same)."""
        window = max(1, round(DEAD_WINDOW * self.total_steps)) * self.params.batch_size
        dead = self.sae.dead_latents(window).nonzero().squeeze(1)
        if len(dead):
            directions = self._residual_directions(pool, len(dead), seed + step)
            changed = self.sae.resample_latents_(dead, directions)
            self._reset_optimizer_rows(changed, dead)
            self.sae.samples_since_fired[dead] = 0
        self.resampled.append({"step": step, "latents": int(len(dead))})
        return int(len(dead))

    def _residual_directions(self, pool: torch.Tensor, count: int, seed: int) -> torch.Tensor:
        """``count`` unit residuals ``x - x^`` (normalised units) of pool rows drawn with probability proportional
        to their squared error."""
        was_training = self.sae.training
        self.sae.eval()
        normalised = self.sae.normalise(pool)
        residual = normalised - self.sae.normalise(self.sae(pool).reconstruction)
        self.sae.train(was_training)
        weights = residual.double().pow(2).sum(1)
        if not bool(weights.sum() > 0):
            weights = torch.ones_like(weights)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        chosen = torch.multinomial(weights.cpu(), count, replacement=True, generator=generator).to(pool.device)
        directions = residual[chosen]
        return directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def _reset_optimizer_rows(self, parameters: list[torch.nn.Parameter], latents: torch.Tensor) -> None:
        """Zero Adam's moments of the resampled rows (the first axis indexes latents in every parameter given)."""
        for parameter in parameters:
            state = self.optimizer.state.get(parameter, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][latents] = 0

    # -- checkpoints -------------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What a resumed run needs; read at a checkpoint (a period in progress is part of it)."""
        return {
            "log_multiplier": float(self.log_multiplier),
            "control_step": float(self.control_step),
            "last_sign": float(self.last_sign),
            "period_active": float(self.period_active),
            "period_rows": self.period_rows,
            "resampled": self.resampled,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.log_multiplier.fill_(float(state.get("log_multiplier", 0.0)))
        self.control_step.fill_(float(state.get("control_step", FIRST_STEP)))
        self.last_sign.fill_(float(state.get("last_sign", 0.0)))
        self.period_active.fill_(float(state.get("period_active", 0.0)))
        self.period_rows = int(state.get("period_rows", 0))
        self.resampled = list(state.get("resampled", []))

    def summary(self) -> dict[str, Any]:
        """What the schedule did, for the run's summary."""
        record: dict[str, Any] = {"resampled": self.resampled}
        if self.controls:
            record["penalty_multiplier"] = self.penalty_multiplier
            record["target_l0"] = self.params.target_l0
        return record
