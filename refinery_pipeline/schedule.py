"""Learning-rate schedules for ``refine train``: a linear warm-up, then one of the decays users
know from torchvision's classification reference (linear to zero, cosine, step).

Each schedule is a per-step factor for ``torch.optim.lr_scheduler.LambdaLR``, stepped once per
batch. The scheduler's saved state is only the step count, so ``--resume`` continues any of
them exactly, and a fractional ``--warmup-epochs`` means what it says.
"""
import math

LR_SCHEDULERS = ("linear", "cosine", "step")


def lr_factor(scheduler: str, steps_per_epoch: int, epochs: int, warmup_epochs: float,
              step_size: int = 30, gamma: float = 0.1):
    """The LR multiplier as a function of the step: ramp up linearly over ``warmup_epochs``,
    then decay ``linear``ly to 0, along a ``cosine`` to 0, or by ``gamma`` every ``step_size``
    epochs (``step``, counted from the first epoch as torchvision's StepLR does)."""
    if scheduler not in LR_SCHEDULERS:
        raise ValueError(f"unknown LR scheduler {scheduler!r}; choose one of {LR_SCHEDULERS}")
    total = steps_per_epoch * epochs
    warm = max(1, int(steps_per_epoch * warmup_epochs))
    steps_per_decay = max(1, steps_per_epoch * step_size)

    def decay(step: int) -> float:  # after the warm-up; 1 at its end
        if scheduler == "linear":  # written as before the other schedules, bit for bit
            return max(0.0, (total - step) / max(1, total - warm))
        if scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
        return gamma ** (step // steps_per_decay)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm * (decay(step) if scheduler == "step" else 1.0)
        return decay(step)
    return factor
