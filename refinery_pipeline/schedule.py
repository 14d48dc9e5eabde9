"""Learning-rate schedules for ``refine train``: a linear warm-up, then one of the decays users
know from torchvision's classification reference (linear to zero, cosine, step) and torch's
MultiStepLR (``multistep``: the paper's ÷10 at epochs 140 and 170).

Each schedule is a per-step factor for ``torch.optim.lr_scheduler.LambdaLR``, stepped once per
batch. The scheduler's saved state is only the step count, so ``--resume`` continues any of
them exactly, and a fractional ``--warmup-epochs`` means what it says.
"""
import bisect
import math

LR_SCHEDULERS = ("linear", "cosine", "step", "multistep")
DECAYS_BY_GAMMA = ("step", "multistep")  # their warm-up ramps towards the decayed factor


def lr_factor(scheduler: str, steps_per_epoch: int, epochs: int, warmup_epochs: float,
              step_size: int = 30, gamma: float = 0.1, milestones=()):
    """The LR multiplier as a function of the step: ramp up linearly over ``warmup_epochs``,
    then decay ``linear``ly to 0, along a ``cosine`` to 0, by ``gamma`` every ``step_size``
    epochs (``step``, counted from the first epoch as torchvision's StepLR does), or by
    ``gamma`` at each epoch of ``milestones`` (``multistep``, as torch's MultiStepLR stepped
    once per epoch: from epoch ``m`` on, ``gamma ** (milestones passed)``)."""
    if scheduler not in LR_SCHEDULERS:
        raise ValueError(f"unknown LR scheduler {scheduler!r}; choose one of {LR_SCHEDULERS}")
    total = steps_per_epoch * epochs
    warm = max(1, int(steps_per_epoch * warmup_epochs))
    steps_per_decay = max(1, steps_per_epoch * step_size)
    milestone_steps = sorted(steps_per_epoch * int(m) for m in milestones)

    def decay(step: int) -> float:  # after the warm-up; 1 at its end
        if scheduler == "linear":  # written as before the other schedules, bit for bit
            return max(0.0, (total - step) / max(1, total - warm))
        if scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
        if scheduler == "multistep":
            return gamma ** bisect.bisect_right(milestone_steps, step)
        return gamma ** (step // steps_per_decay)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm * (decay(step) if scheduler in DECAYS_BY_GAMMA else 1.0)
        return decay(step)
    return factor


def milestone_problem(scheduler: str, milestones, epochs: int):
    """Why ``milestones`` do not fit ``scheduler`` and ``epochs`` (one line naming the fix), or
    None. Milestones with another scheduler, or none with ``multistep``, would silently train
    another schedule than asked; one at or past the last epoch would never apply."""
    if scheduler != "multistep":
        return (f"--lr-milestones {','.join(map(str, milestones))}: only the multistep scheduler "
                "decays at milestones; pass --lr-scheduler multistep") if milestones else None
    if not milestones:
        return ("--lr-scheduler multistep: no --lr-milestones given; pass the epochs to decay "
                "at, e.g. --lr-milestones 140,170")
    late = [m for m in milestones if m >= epochs]
    if late:
        return (f"--lr-milestones {','.join(map(str, milestones))}: epoch {late[0]} is not "
                f"before the run's end (--epochs {epochs}); give milestones below {epochs}")
    return None
