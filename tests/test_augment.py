"""Differentiable augmentation: each transform against DiffAugment's / ADA's definition, the draws, the penalty's
point of evaluation, and the adaptive probability (its signal, its controller, its agreement and its checkpoint)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from tests.support import ADAPTIVE, run_trainer, tiny_config
from trainer import augment, losses

ALL = list(augment.POLICIES)


def images(n=6, c=3, r=16, seed=0):
    return torch.rand(n, c, r, r, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def draws_for(policy, n=6, r=16, p=1.0, seed=0):
    return augment.draw(policy, n, r, p, torch.Generator().manual_seed(seed), "cpu")


def test_probability_zero_is_the_identity_for_every_transform():
    x = images()
    assert torch.equal(augment.apply(x, draws_for(ALL, p=0.0)), x)


@pytest.mark.parametrize("name", ALL)
def test_each_transform_changes_images_at_probability_one(name):
    x = images(n=32)
    out = augment.apply(x, draws_for([name], n=32))
    changed = (out - x).flatten(1).abs().amax(dim=1) > 0
    # xflip changes about half the samples (a coin), rotate90 three quarters, the others (nearly) all
    assert changed.float().mean() > 0.3, name
    assert out.shape == x.shape


def test_color_follows_diffaugment_with_the_same_draws():
    x = images()
    draws = draws_for(["color"])
    b, s, c = (draws[k].view(-1, 1, 1, 1) for k in ("brightness", "saturation", "contrast"))
    # DiffAugment.rand_brightness, rand_saturation, rand_contrast with the draws made explicit:
    reference = x + b  # x + (u - 0.5)
    mean = reference.mean(dim=1, keepdim=True)
    reference = (reference - mean) * s + mean  # s = 2u
    mean = reference.mean(dim=[1, 2, 3], keepdim=True)
    reference = (reference - mean) * c + mean  # c = u + 0.5
    torch.testing.assert_close(augment.apply(x, draws), reference)
    assert draws["brightness"].abs().max() <= 0.5 and (draws["saturation"] <= 2).all()
    assert ((draws["contrast"] >= 0.5) & (draws["contrast"] <= 1.5)).all()


def diffaugment_translation(x, translation_x, translation_y):
    """DiffAugment's rand_translation (its own code) with the shifts passed in instead of drawn."""
    grid_batch, grid_x, grid_y = torch.meshgrid(
        torch.arange(x.size(0)), torch.arange(x.size(2)), torch.arange(x.size(3)), indexing="ij"
    )
    grid_x = torch.clamp(grid_x + translation_x.view(-1, 1, 1) + 1, 0, x.size(2) + 1)
    grid_y = torch.clamp(grid_y + translation_y.view(-1, 1, 1) + 1, 0, x.size(3) + 1)
    x_pad = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
    return x_pad.permute(0, 2, 3, 1).contiguous()[grid_batch, grid_x, grid_y].permute(0, 3, 1, 2)


def test_translation_is_diffaugments_for_shifts_of_one_pixel():
    """DiffAugment pads ONE pixel of zeros and clamps the index, so its shifts only agree with a true shift by
    zero padding up to one pixel; within that range the two are identical (and ours is a true shift beyond)."""
    x = images()
    shifts = torch.tensor([[1, -1], [0, 1], [-1, 0], [1, 1], [0, 0], [-1, -1]])
    ours = augment.shift_images(x, shifts, reflect=False)
    theirs = diffaugment_translation(x, -shifts[:, 0], -shifts[:, 1])  # theirs samples at i + t: a shift by -t
    torch.testing.assert_close(ours, theirs)


def test_translation_moves_pixels_and_fills_with_zeros_or_mirrors():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    out = augment.shift_images(x, torch.tensor([[1, 2]]), reflect=False)
    assert torch.equal(out[0, 0, 1:, 2:], x[0, 0, :3, :2]) and out[0, 0, 0].abs().sum() == 0
    assert out[0, 0, :, :2].abs().sum() == 0
    mirrored = augment.shift_images(x, torch.tensor([[0, 2]]), reflect=True)
    padded = F.pad(x, (2, 0, 0, 0), mode="reflect")[..., :4]  # ADA's reflect padding, then the crop
    torch.testing.assert_close(mirrored, padded)
    assert (
        augment.draw(["translation"], 500, 16, 1.0, torch.Generator().manual_seed(0), "cpu")["translation"].abs().max()
        == 2
    )  # R/8


def test_cutout_zeroes_a_square_of_half_the_side():
    x = torch.ones(3, 1, 16, 16)
    centres = torch.tensor([[8, 8], [0, 0], [-16, -16]])  # middle, corner (clipped), outside (not applied)
    out = x * augment.cutout_mask(16, centres)
    assert (out[0] == 0).sum() == 64 and torch.equal((out[0, 0] == 0).nonzero().min(0).values, torch.tensor([4, 4]))
    assert (out[1] == 0).sum() == 16  # the 8x8 square around (0, 0) covers rows/cols -4..3: 4x4 inside
    assert (out[2] == 0).sum() == 0


def test_flips_and_rotations_are_exact():
    x = images(n=4)
    draws = {"rotate90": torch.tensor([0, 1, 2, 3]), "xflip": torch.tensor([True, False, True, False])}
    out = augment.apply(x, draws)
    expected = [x[0].flip(-1), torch.rot90(x[1], 1, (1, 2)), torch.rot90(x[2], 2, (1, 2)).flip(-1),
                torch.rot90(x[3], 3, (1, 2))]  # fmt: skip
    torch.testing.assert_close(out, torch.stack(expected))


def test_draws_for_the_global_batch_give_every_rank_its_rows():
    x = images(n=8)
    draws = draws_for(ALL, n=8, p=0.7)
    whole = augment.apply(x, draws)
    halves = [augment.apply(x[rows], augment.select(draws, rows)) for rows in (slice(0, 4), slice(4, 8))]
    torch.testing.assert_close(torch.cat(halves), whole)
    assert not torch.equal(draws_for(ALL, n=8, seed=1)["brightness"], draws["brightness"])


def test_probability_as_a_device_tensor_gives_the_same_draws_as_a_float():
    a, b = draws_for(ALL, p=0.4), draws_for(ALL, p=torch.tensor(0.4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    share = torch.cat([(v != 0) for k, v in draws_for(["rotate90", "cutout"], n=4000, p=0.4).items()
                       if k == "rotate90"]).float().mean()  # fmt: skip
    assert abs(share - 0.4 * 3 / 4) < 0.03  # applied with p, then k = 1..3 of 4


def test_gradients_flow_through_every_transform():
    x = images().requires_grad_(True)
    augment.apply(x, draws_for(ALL, p=1.0)).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_overfitting_signal_and_controller():
    d = torch.tensor
    assert augment.overfitting(d(2.0), d(2.0), d(0.0)) == 0  # held-out scored like training: no memorising
    assert augment.overfitting(d(2.0), d(0.0), d(0.0)) == 1  # held-out scored like fakes
    assert augment.overfitting(d(0.0), d(1.0), d(2.0)) == 0  # D does not separate yet: no signal
    # unchanged by a shift and a positive scale of D (a WGAN critic has no fixed zero)
    torch.testing.assert_close(augment.overfitting(d(7.0) * 3 + 5, d(4.0) * 3 + 5, d(1.0) * 3 + 5),
                               augment.overfitting(d(7.0), d(4.0), d(1.0)))  # fmt: skip
    p = augment.adjust_p(d(0.5), d(0.9), target=0.6, images=1000, speed_kimg=10)
    assert p.item() == pytest.approx(0.6)
    assert augment.adjust_p(d(0.05), d(0.1), 0.6, 1000, 10).item() == 0.0  # clamped at 0
    assert augment.adjust_p(d(0.95), d(0.9), 0.6, 1000, 10).item() == 1.0  # and at 1


# --------------------------------------------------------------------------------------------------------------
# In the steps: both sides augmented alike, the penalty at the augmented input.


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_the_critic_sees_augmented_reals_and_fakes_and_the_penalty_is_taken_there(tmp_path):
    from trainer.loop import Trainer

    cfg = tiny_config(tmp_path / "run", "augment.policy=[cutout]", "model.d_norm=none", "loss.p=2", "loss.k=20",
                      "loss.r=real-and-fake", "loss.every=1")  # fmt: skip
    trainer = Trainer(cfg)
    critic_before = copy.deepcopy(trainer.nets.critic_core)
    seen = []
    hook = trainer.nets.critic_core.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    try:
        real = trainer.batches.next(0)
        result = trainer.steps.critic_step(real, 0)
    finally:
        hook.remove()
        trainer.batches.close()
    critic_in, b = seen[0], real.shape[0]
    # cutout is an 8 x 8 square of zeros (clipped at the edges, at least 4 x 4): in every real and every fake
    zeros = (critic_in == 0).flatten(1).sum(1)
    assert (zeros[: 2 * b] >= 16).all()
    assert not ((real == 0).flatten(1).sum(1) >= 16).any()  # the batch itself has no such squares

    def penalty_at(x):
        x = x.clone().requires_grad_(True)
        return losses.gradient_penalty(torch.autograd.grad(critic_before(x).sum(), x)[0], "wgan-div", 20.0, 2.0)

    # The penalty is k * mean ||grad_x D(x)||^p at x = the augmented inputs the critic saw ...
    expected = penalty_at(critic_in)
    torch.testing.assert_close(result.stats["loss/penalty"], expected, rtol=1e-5, atol=0)
    # ... not at the images before augmentation.
    assert (penalty_at(torch.cat([real, critic_in[b:]])) - expected).abs() > 1e-3 * expected


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_the_generator_step_augments_its_fakes_differentiably(tmp_path):
    from trainer.loop import Trainer

    grads = {}
    for policy in ("[]", "[translation,cutout]"):
        trainer = Trainer(tiny_config(tmp_path / policy, f"augment.policy={policy}"))
        seen = []
        critic = trainer.nets.critic_core
        hook = critic.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0].detach()))
        trainer.steps._update = lambda optimizer, module, measure, prefix, stats: torch.zeros((), dtype=torch.bool)
        trainer.steps.generator_step(0)
        hook.remove()
        grads[policy] = torch.cat([p.grad.flatten() for p in trainer.nets.generator_core.parameters()])
        assert torch.isfinite(grads[policy]).all()
        if policy != "[]":
            assert ((seen[0] == 0).flatten(1).sum(1) >= 16).all()  # every fake got its cutout
    assert not torch.allclose(grads["[]"], grads["[translation,cutout]"])


# --------------------------------------------------------------------------------------------------------------
# Adaptive p through the real CLI: saved, restored, and the run ends where an uninterrupted one does.


def training_state(run_dir, iteration):
    return json.loads((run_dir / "checkpoints" / f"iter-{iteration:07d}" / "training_state.json").read_text())


@pytest.mark.slow
def test_adaptive_p_moves_is_checkpointed_and_resume_is_exact(tmp_path):
    from tests.test_checkpoint import assert_same_files

    common = (*ADAPTIVE, "checkpoint.every=2", "checkpoint.keep=5")
    assert run_trainer(tmp_path / "straight", "train.iterations=4", *common).returncode == 0
    done = run_trainer(tmp_path / "resumed", "train.iterations=2", *common)
    assert done.returncode == 0, done.stdout
    p_at_2 = training_state(tmp_path / "resumed", 2)["counters"]["augment_p"]
    assert 0 < p_at_2 <= 1, p_at_2  # the controller moved p (else this test could not see a lost p)
    done = run_trainer(tmp_path / "resumed", "train.iterations=4", *common, resume="auto")
    assert done.returncode == 0, done.stdout
    assert "augment p" in done.stdout
    assert_same_files(tmp_path / "straight", tmp_path / "resumed", 4)
    straight = training_state(tmp_path / "straight", 4)["counters"]["augment_p"]
    assert training_state(tmp_path / "resumed", 4)["counters"]["augment_p"] == straight
    # the console (and W&B) show the p in use at the logged iteration, not an average over the window
    last = [line for line in done.stdout.splitlines() if line.startswith("it 4/4")][-1]
    assert f"augment p {straight:.3f}" in last, (last, straight)
