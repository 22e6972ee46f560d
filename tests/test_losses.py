"""Losses agree with the competition metric; ignored labels are ignored; gradients flow."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spine_ray.core.schema import N_TARGETS
from spine_ray.ensemble.metric import score_arrays
from spine_ray.stages.losses import any_severe_spinal_loss, grader_loss, severity_loss, slice_loss


@pytest.fixture()
def study_batch():
    """8 studies × 25 targets of random probabilities and labels with gaps."""
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([2, 2, 2], size=(8, N_TARGETS))
    labels = rng.integers(0, 3, size=(8, N_TARGETS))
    labels[rng.uniform(size=labels.shape) < 0.15] = -1
    labels[3, :5] = -1  # a study with no spinal label at all
    return probs, labels


def test_severity_loss_is_the_metric_group_loss(study_batch):
    probs, labels = study_batch
    s = score_arrays(labels, probs)
    logits = torch.log(torch.tensor(probs))
    y = torch.tensor(labels)
    for part, cols in (("spinal", slice(0, 5)), ("foraminal", slice(5, 15)), ("subarticular", slice(15, 25))):
        assert severity_loss(logits[:, cols], y[:, cols]).item() == pytest.approx(getattr(s, part), rel=1e-5)


def test_any_severe_spinal_loss_is_the_metric_term(study_batch):
    probs, labels = study_batch
    s = score_arrays(labels, probs)
    logits = torch.log(torch.tensor(probs))
    study = torch.full(labels.shape, -1)
    study[:, :5] = torch.arange(8)[:, None] + 1000
    got = any_severe_spinal_loss(logits, torch.tensor(labels), study)
    assert got.item() == pytest.approx(s.any_severe_spinal, rel=1e-5)
    # The same study split over several samples (one per level) gives the same value.
    per_level = any_severe_spinal_loss(
        logits[:, :5].reshape(40, 1, 3), torch.tensor(labels[:, :5]).reshape(40, 1), study[:, :5].reshape(40, 1)
    )
    assert per_level.item() == pytest.approx(got.item(), rel=1e-6)


def test_ignored_labels_give_no_gradient_and_all_ignored_gives_zero():
    logits = torch.randn(2, 5, 3, requires_grad=True)
    labels = torch.tensor([[0, 1, 2, -1, -1], [2, -1, 0, 0, 1]])
    severity_loss(logits, labels).backward()
    assert logits.grad[0, 3].abs().max() == 0 and logits.grad[1, 1].abs().max() == 0
    assert logits.grad[0, 2].abs().max() > 0
    none = torch.full((2, 5), -1)
    assert severity_loss(logits, none).item() == 0
    assert any_severe_spinal_loss(logits, none, torch.zeros(2, 5, dtype=torch.long)).item() == 0
    assert slice_loss(torch.randn(2, 5, 5), none).item() == 0


def test_severe_weighs_four_times_normal():
    # Row 0 labelled normal (w 1) costs -ln 0.5; row 1 labelled severe (w 4) costs -ln 0.25.
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]]))
    want = (1 * -np.log(0.5) + 4 * -np.log(0.25)) / 5
    assert severity_loss(logits, torch.tensor([0, 2])).item() == pytest.approx(want)
    want = (1 * -np.log(0.5) + 2 * -np.log(0.25)) / 3
    assert severity_loss(logits, torch.tensor([0, 1])).item() == pytest.approx(want)


def test_slice_loss_prefers_attention_on_the_true_slice():
    target = torch.tensor([[2, 1]])
    right = torch.tensor([[[0.0, 0, 5, 0, 0], [0, 5, 0, 0, 0]]])
    wrong = torch.tensor([[[5.0, 0, 0, 0, 0], [0, 0, 0, 0, 5]]])
    assert slice_loss(right, target) < slice_loss(wrong, target)


def test_grader_loss_combines_terms_and_backpropagates():
    logits = torch.randn(2, 5, 3, requires_grad=True)
    slices = torch.randn(2, 5, 5, requires_grad=True)
    labels = torch.tensor([[0, 1, 2, 0, 0], [2, 2, 0, -1, 1]])
    out = {"logits": logits, "slice_logits": slices}
    parts = grader_loss(out, labels, torch.full((2, 5), 2), torch.tensor([[0] * 5, [1, 1, -1, -1, -1]]),
                        w_slice=0.5, w_any=2.0)
    assert parts["loss"].item() == pytest.approx(
        (parts["severity"] + 0.5 * parts["slice"] + 2.0 * parts["any_severe"]).item())
    assert all(parts[k].item() > 0 for k in ("severity", "slice", "any_severe"))
    parts["loss"].backward()
    assert logits.grad.abs().sum() > 0 and slices.grad.abs().sum() > 0
    only = grader_loss(out, labels)
    assert only["slice"].item() == 0 and only["any_severe"].item() == 0
