"""Heatmap maths: targets, DSNT recovers coordinates, JS properties, masked loss, decoding."""

from __future__ import annotations

import math

import pytest
import torch

from spine_ray.models.heatmap import (
    decode_points,
    dsnt,
    gaussian_heatmap,
    js_divergence,
    keypoint_loss,
    scale_coords,
    spatial_softmax,
)


def test_gaussian_target_sums_to_one_and_peaks_at_the_point():
    h = gaussian_heatmap((8, 16, 16), torch.tensor([[3.0, 5.0, 11.0]]), sigma=1.0)
    assert h.shape == (1, 8, 16, 16)
    assert h.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.nonzero(h[0] == h[0].max())[0].tolist() == [3, 5, 11]


def test_dsnt_of_a_delta_is_the_voxel():
    p = torch.zeros(1, 1, 6, 9, 7)
    p[0, 0, 4, 2, 5] = 1.0
    assert dsnt(p).tolist() == [[[4.0, 2.0, 5.0]]]


@pytest.mark.parametrize("coord", [(3.3, 7.6, 8.25), (4.0, 10.5, 6.9)])
def test_dsnt_of_a_gaussian_recovers_a_subvoxel_point(coord):
    c = torch.tensor([coord])
    h = gaussian_heatmap((8, 20, 16), c, sigma=(0.8, 1.5, 1.5))
    assert torch.allclose(dsnt(h), c, atol=0.02)


def test_dsnt_in_two_dims():
    c = torch.tensor([[[6.4, 3.7]]])
    assert torch.allclose(dsnt(gaussian_heatmap((16, 12), c, 1.0), ndim=2), c, atol=0.02)


def test_js_is_zero_for_identical_symmetric_and_bounded():
    p = spatial_softmax(torch.randn(2, 3, 4, 5, 6))
    q = spatial_softmax(torch.randn(2, 3, 4, 5, 6))
    assert js_divergence(p, p).abs().max().item() < 1e-6
    assert torch.allclose(js_divergence(p, q), js_divergence(q, p), atol=1e-6)
    assert (js_divergence(p, q) > 0).all()
    a = torch.zeros(1, 2, 2, 2)
    b = torch.zeros(1, 2, 2, 2)
    a[0, 0, 0, 0] = 1
    b[0, 1, 1, 1] = 1
    assert js_divergence(a, b).item() == pytest.approx(math.log(2), abs=1e-5)


def test_masked_points_add_no_loss_and_no_gradient():
    logits = torch.randn(2, 3, 4, 8, 8, requires_grad=True)
    target = torch.tensor([[[1.0, 2.0, 3.0], [float("nan")] * 3, [2.0, 4.0, 4.0]],
                           [[0.0, 0.0, 0.0], [3.0, 7.0, 7.0], [float("nan")] * 3]])
    visible = torch.tensor([[True, False, True], [True, True, False]])
    loss = keypoint_loss(logits, target, visible, sigma=1.0)
    assert torch.isfinite(loss)
    loss.backward()
    g = logits.grad
    assert g[0, 1].abs().max() == 0 and g[1, 2].abs().max() == 0
    assert g[0, 0].abs().max() > 0 and g[1, 1].abs().max() > 0
    # The masked mean equals the mean of the visible points' own losses.
    one = torch.ones(1, 1, dtype=torch.bool)
    each = [keypoint_loss(logits[b, p][None, None].detach(), target[b, p][None, None], one, 1.0)
            for b, p in ((0, 0), (0, 2), (1, 0), (1, 1))]
    assert loss.item() == pytest.approx(torch.stack(each).mean().item(), rel=1e-5)


def test_no_visible_points_gives_zero_loss_with_a_graph():
    logits = torch.randn(1, 2, 3, 4, 4, requires_grad=True)
    loss = keypoint_loss(logits, torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.bool), 1.0)
    loss.backward()
    assert loss.item() == 0 and logits.grad.abs().max() == 0


def test_loss_is_smaller_at_the_right_place_and_optimises_towards_it():
    target = torch.tensor([[[2.0, 5.0, 9.0]]])
    vis = torch.ones(1, 1, dtype=torch.bool)
    good = torch.log(gaussian_heatmap((6, 12, 12), target, 1.0) + 1e-8)
    bad = torch.log(gaussian_heatmap((6, 12, 12), torch.tensor([[[4.0, 1.0, 2.0]]]), 1.0) + 1e-8)
    assert keypoint_loss(good, target, vis, 1.0) < keypoint_loss(bad, target, vis, 1.0) - 0.1
    logits = torch.zeros(1, 1, 6, 12, 12, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.5)
    for _ in range(60):
        opt.zero_grad()
        keypoint_loss(logits, target, vis, 1.0).backward()
        opt.step()
    coords, conf = decode_points(logits.detach())
    assert torch.allclose(coords, target, atol=0.3)
    assert conf.shape == (1, 1) and 0 < conf.item() <= 1


def test_scale_coords_round_trips_and_centres_align():
    c = torch.tensor([[10.0, 33.5]])
    assert torch.allclose(scale_coords(scale_coords(c, 0.25), 4.0), c)
    # Input pixels 0..3 at stride 4 share heatmap voxel 0, centred at input 1.5.
    assert scale_coords(torch.tensor([1.5]), 0.25).item() == pytest.approx(0.0)
