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
    None. None given with ``multistep`` would silently train another schedule than asked; one at
    or past the last epoch would never apply. (Milestones with another scheduler are a row of
    :data:`.option_relevance.OPTION_USES`, which ``refine train`` checks first.)"""
    if scheduler != "multistep":
        return None
    if not milestones:
        return ("--lr-scheduler multistep: no --lr-milestones given; pass the epochs to decay "
                "at, e.g. --lr-milestones 140,170")
    late = [m for m in milestones if m >= epochs]
    if late:
        return (f"--lr-milestones {','.join(map(str, milestones))}: epoch {late[0]} is not "
                f"before the run's end (--epochs {epochs}); give milestones below {epochs}")
    return None


# Fewer SGD steps per epoch than this warn. `refine train`'s defaults (batch 256, lr 0.4, 2
# warm-up epochs) on 500 imagenette images took 1 step per epoch, diverged (train loss up to 28)
# and ended at chance; with the LR scaled linearly with the batch, 16 epochs of 1, 2 and 4
# steps did too (10.0-11.5% top-1, loss spikes of 12-31), 8 steps trained (24.5%), 16 better
# (37.5%) (ResNet-18 @ 32 px, benchmarks/results/steps_per_epoch_cpu.md).
MIN_STEPS_PER_EPOCH = 8


def few_steps_problem(images: int, world: int, batch_size: int, lr: float, epochs: int):
    """Why ``batch_size`` leaves an epoch of ``images`` (over ``world`` ranks) too few SGD steps
    for a per-epoch schedule, with a batch size that gives :data:`MIN_STEPS_PER_EPOCH` and the
    learning rate scaled linearly with it (Goyal et al.'s rule); None when it does not."""
    per_rank = -(-images // world)  # as training shards them: padded to equal shares
    steps = per_rank // batch_size
    if steps >= MIN_STEPS_PER_EPOCH:
        return None
    batch = max(1, per_rank // MIN_STEPS_PER_EPOCH)
    ranks = f" ({per_rank} per rank on {world} ranks)" if world > 1 else ""
    return (f"--batch-size {batch_size} on {images} training images{ranks} is {steps} SGD "
            f"step{'' if steps == 1 else 's'} per epoch ({steps * epochs} in {epochs} epochs), "
            f"too few for the learning-rate schedule: such runs diverge; pass --batch-size "
            f"{batch} ({per_rank // batch} steps per epoch) and --lr {lr * batch / batch_size:.3g} "
            f"(--lr {lr:g} scaled linearly with the batch)")


def warmup_problem(warmup_epochs: float, epochs: int):
    """Why a warm-up of ``warmup_epochs`` does not fit a run of ``epochs``, or None: one longer
    than the run ends before the LR reaches its peak, and never decays it."""
    if warmup_epochs <= epochs:
        return None
    return (f"--warmup-epochs {warmup_epochs:g} is longer than the run (--epochs {epochs}): the "
            f"LR rises for the whole run, reaching {epochs / warmup_epochs:.0%} of --lr, and "
            f"never decays; pass --warmup-epochs {epochs / 8:g} or less (the defaults warm up "
            "for an eighth of the run)")
