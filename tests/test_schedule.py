"""LR schedules: warm-up then linear, cosine or step decay, as per-step LambdaLR factors."""
import math

import pytest

from refinery_pipeline.training.schedule import lr_factor

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


def test_multistep_follows_torchs_multisteplr_stepped_per_epoch():
    """The paper's recipe: x gamma at each milestone epoch, as torch.optim.lr_scheduler's
    MultiStepLR gives when stepped once per epoch (here per step, constant within an epoch)."""
    import torch
    milestones, gamma = (2, 4), 0.1
    factor = lr_factor("multistep", STEPS, EPOCHS, warmup_epochs=0, gamma=gamma,
                       milestones=milestones)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    reference = torch.optim.lr_scheduler.MultiStepLR(opt, list(milestones), gamma)
    for epoch in range(EPOCHS):
        expected = opt.param_groups[0]["lr"]
        assert [factor(epoch * STEPS + i) for i in range(STEPS)] == pytest.approx(
            [expected] * STEPS), epoch
        opt.step()
        reference.step()


def test_milestones_must_fit_the_scheduler_and_the_run():
    from refinery_pipeline.training.schedule import milestone_problem
    assert milestone_problem("multistep", (140, 170), 180) is None
    assert milestone_problem("linear", (140, 170), 180) is None  # option_relevance's concern
    assert "--lr-milestones 140,170" in milestone_problem("multistep", (), 180)
    assert "epoch 170 is not before the run's end (--epochs 160)" in milestone_problem(
        "multistep", (140, 170), 160)
    assert milestone_problem("cosine", (), 10) is None
