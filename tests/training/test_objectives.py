"""The training objective: targets per prediction type, min-SNR weights, noise offset, loss split."""
import pytest
import torch
from diffusers import DDPMScheduler

from sdtune.errors import SdtuneError
from sdtune.training import objectives as obj


def _scheduler(kind="epsilon"):
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, prediction_type=kind)


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 4, 8, 8, generator=g)
    noise = obj.sample_noise(x0, g)
    t = obj.sample_timesteps(n, 1000, g)
    return x0, noise, t


def test_epsilon_target_is_the_noise():
    s = _scheduler("epsilon")
    x0, noise, t = _batch()
    assert torch.equal(obj.training_target(s, x0, noise, t), noise)


def test_v_target_is_alpha_eps_minus_sigma_x0_and_recovers_x0():
    s = _scheduler("v_prediction")
    x0, noise, t = _batch()
    v = obj.training_target(s, x0, noise, t)
    a = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    alpha, sigma = a.sqrt(), (1 - a).sqrt()
    torch.testing.assert_close(v, alpha * noise - sigma * x0)
    # The defining property: from x_t and v both x0 and eps come back exactly.
    xt = obj.add_noise(s, x0, noise, t)
    torch.testing.assert_close(alpha * xt - sigma * v, x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sigma * xt + alpha * v, noise, atol=1e-5, rtol=1e-5)
    # ...and it agrees with diffusers' own velocity.
    torch.testing.assert_close(v, s.get_velocity(x0, noise, t), atol=1e-6, rtol=1e-5)


def test_sample_target_and_unknown_prediction_type():
    x0, noise, t = _batch()
    assert torch.equal(obj.training_target(_scheduler("sample"), x0, noise, t), x0)
    s = _scheduler()
    s.register_to_config(prediction_type="flow")
    with pytest.raises(SdtuneError, match="prediction_type 'flow'"):
        obj.training_target(s, x0, noise, t)


def test_min_snr_weights():
    s = _scheduler()
    t = torch.tensor([0, 10, 100, 500, 999])
    snr = obj.snr(s, t)
    a = s.alphas_cumprod[t]
    torch.testing.assert_close(snr, a / (1 - a))
    assert bool((snr[:-1] > snr[1:]).all())  # more noise, less signal
    gamma = 5.0
    w_eps = obj.min_snr_weights(snr, gamma, "epsilon")
    w_v = obj.min_snr_weights(snr, gamma, "v_prediction")
    for i, value in enumerate(snr.tolist()):
        assert w_eps[i].item() == pytest.approx(min(value, gamma) / value, rel=1e-5)
        assert w_v[i].item() == pytest.approx(min(value, gamma) / (value + 1), rel=1e-5)
    # Low-noise steps (SNR > gamma) are down-weighted; high-noise ones keep weight 1 (epsilon).
    assert w_eps[0] < 0.1 and w_eps[-1].item() == pytest.approx(1.0)


def test_noise_offset_shifts_each_channel_by_a_constant():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x = torch.zeros(64, 4, 16, 16)
    plain = obj.sample_noise(x, g1)
    offset = obj.sample_noise(x, g2, noise_offset=0.5)
    diff = offset - plain
    # same base noise, plus one constant per (example, channel) with std ~ 0.5
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-5)
    assert 0.4 < diff[:, :, 0, 0].std().item() < 0.6
    assert torch.equal(obj.sample_noise(x, torch.Generator().manual_seed(3)), plain)  # replayable


def test_dreambooth_loss_splits_instance_and_prior():
    per = torch.tensor([1.0, 3.0, 10.0, 20.0])
    is_class = torch.tensor([False, False, True, True])
    total, inst, prior = obj.dreambooth_loss(per, is_class, prior_loss_weight=0.5)
    assert inst.item() == 2.0 and prior.item() == 15.0 and total.item() == 2.0 + 0.5 * 15.0
    total, inst, prior = obj.dreambooth_loss(per[:2], is_class[:2], 1.0)
    assert prior is None and total.item() == inst.item() == 2.0
    w = torch.tensor([1.0, 0.0, 1.0, 0.5])
    total, inst, prior = obj.dreambooth_loss(per, is_class, 1.0, weights=w)
    assert inst.item() == 0.5 and prior.item() == 10.0


def test_per_example_mse():
    pred = torch.zeros(2, 4, 2, 2)
    target = torch.stack([torch.ones(4, 2, 2), 2 * torch.ones(4, 2, 2)])
    assert obj.per_example_mse(pred, target).tolist() == [1.0, 4.0]


def test_a_masked_mse_is_the_weighted_mean_and_ones_change_nothing():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    ones = torch.ones(2, 1, 4, 4)
    assert torch.allclose(obj.per_example_mse(pred, target, ones), obj.per_example_mse(pred, target))
    half = torch.zeros(2, 1, 4, 4)
    half[..., :2] = 1.0  # only the left half counts
    assert torch.allclose(obj.per_example_mse(pred, target, half),
                          obj.per_example_mse(pred[..., :2], target[..., :2]))
    # the right half is free: changing the prediction there changes nothing
    moved = pred.clone()
    moved[..., 2:] += 5.0
    assert torch.allclose(obj.per_example_mse(moved, target, half), obj.per_example_mse(pred, target, half))
    # kohya's mean over the pixels: the same half, scaled by the share it covers, and still free on the right
    by_pixels = obj.per_example_mse(pred, target, half, mean_over="pixels")
    assert torch.allclose(by_pixels, 0.5 * obj.per_example_mse(pred, target, half))
    assert torch.allclose(obj.per_example_mse(moved, target, half, mean_over="pixels"), by_pixels)
    assert torch.allclose(obj.per_example_mse(pred, target, ones, mean_over="pixels"), obj.per_example_mse(pred, target))
    with pytest.raises(ValueError, match="mean_over"):
        obj.per_example_mse(pred, target, half, mean_over="mask")


def test_mask_weights_average_the_pixels_a_latent_covers_and_keep_the_floor():
    masks = torch.zeros(1, 1, 8, 8)
    masks[..., :4, :4] = 1.0  # the top-left quarter is the subject
    masks[..., 4:6, 4:6] = 1.0  # a quarter of the bottom-right latent pixel
    w = obj.mask_weights(masks, (2, 2), floor=0.2)
    assert torch.allclose(w[0, 0], torch.tensor([[1.0, 0.2], [0.2, 0.2 + 0.8 * 0.25]]))
    assert torch.equal(obj.mask_weights(masks, (2, 2), floor=1.0), torch.ones(1, 1, 2, 2))  # floor 1: no mask
