"""LR schedules: warm-up then linear, cosine or step decay, as per-step LambdaLR factors."""
import math

import pytest

from refinery_pipeline.schedule import lr_factor

STEPS, EPOCHS = 10, 6


@pytest.mark.parametrize("scheduler", ["linear", "cosine", "step"])
def test_warm_up_rises_linearly_to_the_base_lr(scheduler):
    factor = lr_factor(scheduler, STEPS, EPOCHS, warmup_epochs=1.5)
    assert [factor(s) for s in (0, 7, 14)] == pytest.approx([1 / 15, 8 / 15, 1.0])


def test_linear_decays_to_zero_at_the_last_step():
    factor = lr_factor("linear", STEPS, EPOCHS, warmup_epochs=1)
    assert factor(10) == 1.0 and factor(35) == pytest.approx(0.5)
    assert factor(STEPS * EPOCHS) == 0.0


def test_cosine_is_half_way_down_half_way_through_the_decay():
    factor = lr_factor("cosine", STEPS, EPOCHS, warmup_epochs=1)
    assert factor(10) == 1.0 and factor(35) == pytest.approx(0.5)
    assert factor(59) == pytest.approx(0.5 * (1 + math.cos(math.pi * 49 / 50)))
    assert factor(60) == pytest.approx(0.0)


def test_step_multiplies_by_gamma_every_step_size_epochs():
    factor = lr_factor("step", STEPS, EPOCHS, warmup_epochs=0, step_size=2, gamma=0.1)
    assert [factor(s) for s in (0, 19, 20, 39, 40, 59)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])


def test_unknown_scheduler_is_refused():
    with pytest.raises(ValueError, match="cosine"):
        lr_factor("exp", STEPS, EPOCHS, 1)
