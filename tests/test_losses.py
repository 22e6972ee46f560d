"""Losses agree with the competition metric and with their old data-dependent versions; no host reads; gradients flow."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from spine_ray.core.schema import N_TARGETS, SEVERITY_WEIGHTS
from spine_ray.ensemble.metric import score_arrays
from spine_ray.models.heatmap import (
    dsnt,
    gaussian_heatmap,
    js_divergence,
    keypoint_loss,
    scale_coords,
    spatial_softmax,
)
from spine_ray.stages.losses import (
    IGNORE,
    any_severe_spinal_loss,
    grader_loss,
    severity_loss,
    slice_loss,
)
from spine_ray.stages.onestage import VIEW_NAMES, OneStageConfig, onestage_loss


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


# --- Issue 28: branch-free, fixed-shape losses ---------------------------------------------------
# The implementations before the rewrite, verbatim, kept to prove the new ones equal (values and
# gradients) and the no-sync check able to fail.


def _old_soft_targets(labels: torch.Tensor, n: int) -> torch.Tensor:
    y = labels.long()
    return F.one_hot(y.clamp(min=0), n).float() * (y != IGNORE)[..., None].float()


def _old_is_soft(target: torch.Tensor, logits: torch.Tensor) -> bool:
    return target.is_floating_point() and target.ndim == logits.ndim


def _old_severity_loss(logits, labels, weights=SEVERITY_WEIGHTS):
    flat = logits.reshape(-1, logits.shape[-1]).float()
    w = torch.as_tensor(weights, dtype=flat.dtype, device=flat.device)
    if not _old_is_soft(labels, logits):
        y = labels.reshape(-1).long()
        if not (y != IGNORE).any():
            return flat.sum() * 0.0
        return F.cross_entropy(flat, y, weight=w, ignore_index=IGNORE)
    q = labels.reshape(flat.shape).to(flat.dtype) * w
    if not (q.sum() > 0):
        return flat.sum() * 0.0
    return -(q * F.log_softmax(flat, -1)).sum() / q.sum()


def _old_any_severe_spinal_loss(logits, labels, study, weights=SEVERITY_WEIGHTS, eps=1e-7):
    p_sev = F.softmax(logits.float(), dim=-1)[..., 2].reshape(-1)
    q = (labels if _old_is_soft(labels, logits) else _old_soft_targets(labels, logits.shape[-1])).reshape(-1, logits.shape[-1]).to(p_sev.dtype)
    mass, g = q.sum(-1), study.reshape(-1).long()
    keep = (g >= 0) & (mass > 0)
    if not keep.any():
        return logits.sum() * 0.0
    p_sev, q, mass, g = p_sev[keep], q[keep], mass[keep], g[keep]
    groups, gi = torch.unique(g, return_inverse=True)
    n = len(groups)
    w_table = torch.as_tensor(weights, dtype=p_sev.dtype, device=p_sev.device)

    def group_max(v):
        return torch.full((n,), -1.0, dtype=v.dtype, device=v.device).scatter_reduce(
            0, gi, v, reduce="amax", include_self=True
        )

    p = group_max(p_sev).clamp(eps, 1 - eps)
    target = group_max(q[:, 2] / mass)
    w = group_max((q * w_table).sum(-1) / mass)
    nll = -(target * torch.log(p) + (1 - target) * torch.log1p(-p))
    return (w * nll).sum() / w.sum()


def _old_slice_loss(slice_logits, slice_target):
    flat = slice_logits.reshape(-1, slice_logits.shape[-1]).float()
    if not _old_is_soft(slice_target, slice_logits):
        y = slice_target.reshape(-1).long()
        if not (y != IGNORE).any():
            return flat.sum() * 0.0
        return F.cross_entropy(flat, y, ignore_index=IGNORE)
    q = slice_target.reshape(flat.shape).to(flat.dtype)
    if not (q.sum() > 0):
        return flat.sum() * 0.0
    return -(q * F.log_softmax(flat, -1)).sum() / q.sum()


def _old_keypoint_loss(logits, target_coords, visible, sigma, w_js=1.0, w_coord=1.0):
    ndim = target_coords.shape[-1]
    shape = logits.shape[-ndim:]
    visible = visible.bool()
    centre = torch.tensor([(n - 1) / 2 for n in shape], device=logits.device)
    tc = torch.where(visible[..., None], target_coords.float(), centre)
    probs = spatial_softmax(logits, ndim)
    per_point = torch.zeros(visible.shape, device=logits.device)
    if w_js:
        per_point = per_point + w_js * js_divergence(probs, gaussian_heatmap(shape, tc, sigma), ndim)
    if w_coord:
        extent = torch.tensor([max(n - 1, 1) for n in shape], device=logits.device, dtype=torch.float32)
        per_point = per_point + w_coord * ((dsnt(probs, ndim) - tc).abs() / extent).sum(-1)
    per_point = torch.where(visible, per_point, torch.zeros_like(per_point))
    return per_point.sum() / visible.sum().clamp_min(1)


def _old_scale_coords(coords, scale):
    s = torch.as_tensor(scale, dtype=coords.dtype, device=coords.device)
    return (coords + 0.5) * s - 0.5


def _value_and_grad(fn, x: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, *args)
    (grad,) = torch.autograd.grad(out, x)
    return out.detach().float(), grad


def _assert_same(new, old, x: torch.Tensor, *args) -> None:
    """Same value and same gradient w.r.t. x."""
    v_new, g_new = _value_and_grad(new, x, *args)
    v_old, g_old = _value_and_grad(old, x, *args)
    torch.testing.assert_close(v_new, v_old, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_new, g_old, rtol=1e-5, atol=1e-6)


def _mixed(gen: torch.Generator, shape: tuple[int, ...], n: int, p_unlabelled: float = 0.2) -> torch.Tensor:
    """Soft targets as CutMix makes them: λ·onehot(a) + (1−λ)·onehot(b), either side possibly unlabelled."""
    def side() -> torch.Tensor:
        y = torch.randint(0, n, shape, generator=gen)
        y[torch.rand(shape, generator=gen) < p_unlabelled] = IGNORE
        return _old_soft_targets(y, n)

    lam = torch.rand(shape, generator=gen)[..., None]
    return lam * side() + (1 - lam) * side()


def _labels(gen: torch.Generator, shape: tuple[int, ...], n: int = 3, p_unlabelled: float = 0.2) -> torch.Tensor:
    y = torch.randint(0, n, shape, generator=gen)
    y[torch.rand(shape, generator=gen) < p_unlabelled] = IGNORE
    return y


WEIGHTS = [SEVERITY_WEIGHTS, (1.0, 1.0, 1.0), (0.5, 1.0, 3.0)]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("weights", WEIGHTS)
def test_severity_loss_equals_the_old_one(seed, weights):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 25, 3, generator=gen) * 3
    loss = lambda x, y: severity_loss(x, y, weights)  # noqa: E731
    old = lambda x, y: _old_severity_loss(x, y, weights)  # noqa: E731
    for y in (
        _labels(gen, (6, 25)),  # random, with gaps
        torch.full((6, 25), IGNORE),  # no labelled target
        torch.randint(0, 2, (6, 25), generator=gen),  # severe absent from the batch
        torch.full((6, 25), 2),  # only severe
        _mixed(gen, (6, 25), 3),  # soft, some parts unlabelled
        torch.zeros(6, 25, 3),  # soft, no mass at all
    ):
        _assert_same(loss, old, logits, y)
    _assert_same(loss, old, logits[0, :1], torch.tensor([1]))  # a single labelled target
    _assert_same(loss, old, logits[0, :1], torch.tensor([[0.0, 0.3, 0.0]]))  # total mass below 1


@pytest.mark.parametrize("seed", range(4))
def test_slice_loss_equals_the_old_one(seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 7, 9, generator=gen) * 3
    logits[:, :, 6:] = -1e4  # slices beyond the volume, as the Grader masks them
    for y in (
        _labels(gen, (4, 7), 6),
        torch.full((4, 7), IGNORE),
        torch.full((4, 7), 7),  # a target on a masked slice
        _mixed(gen, (4, 7), 9),
        torch.zeros(4, 7, 9),
    ):
        _assert_same(slice_loss, _old_slice_loss, logits, y)
    _assert_same(slice_loss, _old_slice_loss, logits[0, :1], 0.2 * F.one_hot(torch.tensor([3]), 9).float())  # mass below 1


def _studies(gen: torch.Generator, b: int, t: int, spinal: int = 5) -> torch.Tensor:
    """Study ids of the spinal targets (large, arbitrary ids; some studies share samples), −1 elsewhere."""
    study = torch.full((b, t), -1)
    study[:, :spinal] = (10**12 + torch.randint(0, max(1, b // 2), (b,), generator=gen))[:, None]
    return study


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("weights", WEIGHTS)
def test_any_severe_spinal_loss_equals_the_old_one(seed, weights):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(8, 25, 3, generator=gen) * 3
    loss = lambda x, y, s: any_severe_spinal_loss(x, y, s, weights)  # noqa: E731
    old = lambda x, y, s: _old_any_severe_spinal_loss(x, y, s, weights)  # noqa: E731
    study = _studies(gen, 8, 25)
    y = _labels(gen, (8, 25), p_unlabelled=0.3)
    y[3, :5] = IGNORE  # a study sample with no spinal label
    for labels, s in (
        (y, study),
        (_mixed(gen, (8, 25), 3, 0.3), study),  # soft
        (torch.full((8, 25), IGNORE), study),  # all targets unlabelled
        (y, torch.full((8, 25), -1)),  # no spinal target in the batch
        (torch.where(study >= 0, IGNORE, y), study),  # labels only off the spine
        (torch.randint(0, 2, (8, 25), generator=gen), study),  # no severe label
        (y, torch.where(study >= 0, 7, -1)),  # one study across every sample
        (y, torch.where(study >= 0, torch.arange(8 * 25).reshape(8, 25), -1)),  # a study per target
    ):
        _assert_same(loss, old, logits, labels, s)
    # Ties in p(severe) within a study: the max's gradient is shared alike.
    tied = logits.clone()
    tied[:, 1:5] = tied[:, :1]
    _assert_same(loss, old, tied, y, study)
    # One study's five levels split over five samples.
    _assert_same(loss, old, logits[:, :5].reshape(40, 1, 3), y[:, :5].reshape(40, 1), study[:, :5].reshape(40, 1))


def test_grader_loss_parts_equal_the_old_ones():
    gen = torch.Generator().manual_seed(5)
    logits, slices = torch.randn(4, 25, 3, generator=gen), torch.randn(4, 25, 7, generator=gen)
    labels, st, study = _labels(gen, (4, 25)), _labels(gen, (4, 25), 7), _studies(gen, 4, 25)
    parts = grader_loss({"logits": logits, "slice_logits": slices}, labels, st, study, 0.3, 2.0)
    want = {"severity": _old_severity_loss(logits, labels), "slice": _old_slice_loss(slices, st),
            "any_severe": _old_any_severe_spinal_loss(logits, labels, study)}
    want["loss"] = want["severity"] + 0.3 * want["slice"] + 2.0 * want["any_severe"]
    for k, v in want.items():
        torch.testing.assert_close(parts[k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("shape", "sigma", "w_js", "w_coord"), [
    ((4, 6, 5), 1.0, 1.0, 1.0),
    ((3, 8, 8), (0.7, 1.5, 1.5), 1.0, 0.5),
    ((1, 6, 6), 1.0, 0.0, 1.0),  # one slice: extent 1 on that axis
    ((6, 7), 1.2, 1.0, 0.0),  # 2-D
])
def test_keypoint_loss_equals_the_old_one(seed, shape, sigma, w_js, w_coord):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, *shape, generator=gen) * 2
    coords = torch.rand(2, 5, len(shape), generator=gen) * torch.tensor(shape) - 0.5
    coords[0, 0] = 1e6  # a far, garbage point: invisible below, so it must add nothing
    loss = lambda x, c, v: keypoint_loss(x, c, v, sigma, w_js, w_coord)  # noqa: E731
    old = lambda x, c, v: _old_keypoint_loss(x, c, v, sigma, w_js, w_coord)  # noqa: E731
    vis = torch.rand(2, 5, generator=gen) < 0.6
    vis[0, 0] = False
    inside = coords.clone()
    inside[0, 0] = 1.0
    for c, v in ((coords, vis), (coords, torch.zeros(2, 5, dtype=torch.bool)), (inside, torch.ones(2, 5, dtype=torch.bool))):
        _assert_same(loss, old, logits, c, v)


@pytest.mark.parametrize("scale", [0.25, 4, [1.0, 0.25, 0.25], (1.0, 4.0, 4.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scale_coords_equals_the_old_one(scale, dtype):
    c = torch.rand(2, 5, 3, dtype=dtype) * 40 - 1
    torch.testing.assert_close(scale_coords(c, scale), _old_scale_coords(c, scale))


# No host sync: the CPU stands in for the GPU with the meta device, whose tensors have shapes but no
# values. Reading a value (`if` on a tensor, .item(), float(), .tolist(), .cpu()) or an op whose
# output shape depends on values (x[mask], torch.unique, nonzero, one-argument where) raises there,
# and a mode records tensors built on the host and moved to the device (on CUDA, a blocking copy
# synchronises the stream). torch.compile(fullgraph=True) is no such check on this torch: it traces
# .item(), x[mask] and torch.unique without complaint and stops only at a Python branch.


class _HostToDevice(TorchFunctionMode):
    """Records every tensor made from host data or a host tensor that lands on another device."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        built = func in (torch.tensor, torch.as_tensor) and not isinstance(args[0], torch.Tensor)
        moved = any(isinstance(a, torch.Tensor) and a.device.type == "cpu" and a.ndim for a in tree_leaves((args, kwargs)))
        if (built or moved) and isinstance(out, torch.Tensor) and out.device.type != "cpu":
            self.copies.append(getattr(func, "__name__", str(func)))
        return out


def _host_copies(fn, *args) -> list[str]:
    """Forward and backward of fn on meta tensors; raises on a host read, returns the host→device copies."""
    with _HostToDevice() as mode:
        out = fn(*args)
    out.backward()  # the backward graph runs on meta too: a read there raises as well
    return mode.copies


def _meta_cases() -> dict[str, tuple]:
    m = "meta"
    logits = torch.empty(4, 25, 3, device=m, requires_grad=True)
    slices = torch.empty(4, 25, 7, device=m, requires_grad=True)
    heat = torch.empty(2, 5, 4, 6, 6, device=m, requires_grad=True)
    hard = torch.empty(4, 25, dtype=torch.long, device=m)
    soft = torch.empty(4, 25, 3, device=m)
    study = torch.empty(4, 25, dtype=torch.long, device=m)
    coords, vis = torch.empty(2, 5, 3, device=m), torch.empty(2, 5, dtype=torch.bool, device=m)
    return {
        "severity_loss": (severity_loss, _old_severity_loss, logits, hard),
        "severity_loss soft": (severity_loss, _old_severity_loss, logits, soft),
        "slice_loss": (slice_loss, _old_slice_loss, slices, hard),
        "any_severe_spinal_loss": (any_severe_spinal_loss, _old_any_severe_spinal_loss, logits, hard, study),
        "any_severe_spinal_loss soft": (any_severe_spinal_loss, _old_any_severe_spinal_loss, logits, soft, study),
        "keypoint_loss": (lambda *a: keypoint_loss(*a, sigma=1.0), lambda *a: _old_keypoint_loss(*a, sigma=1.0), heat, coords, vis),
        "scale_coords": (lambda x: scale_coords(x, [1.0, 0.25, 0.25]).sum(), lambda x: _old_scale_coords(x, [1.0, 0.25, 0.25]).sum(),
                         torch.empty(2, 5, 3, device=m, requires_grad=True)),
    }


@pytest.mark.parametrize("read", [
    lambda x, y: x.sum() if (y >= 0).any() else x.sum() * 0,  # Python branch on a tensor
    lambda x, y: x[y >= 0].sum(),  # boolean-mask indexing
    lambda x, y: x.sum() * len(torch.unique(y)),
    lambda x, y: x.sum() * torch.nonzero(y).shape[0],
    lambda x, y: x.sum() * torch.where(y >= 0)[0].shape[0],
    lambda x, y: x.sum() * x.sum().item(),
    lambda x, y: x.sum() * float(x.detach().sum()),
    lambda x, y: x.sum() * sum(y.tolist()),
    lambda x, y: x.sum().cpu(),
    lambda x, y: x.sum() * torch.tensor([1.0, 2.0], device=x.device).sum(),  # host-built constant
])
def test_the_no_sync_check_catches_each_host_read(read):
    x = torch.empty(6, 3, device="meta", requires_grad=True)
    y = torch.empty(6, dtype=torch.long, device="meta")
    try:
        copies = _host_copies(read, x, y)
    except (RuntimeError, NotImplementedError):
        return
    assert copies


@pytest.mark.parametrize("case", list(_meta_cases()))
def test_losses_run_without_reading_the_device(case):
    new, old, *args = _meta_cases()[case]
    assert _host_copies(new, *args) == []
    # The check can fail: the old implementation reads a value (raises) or copies a host tensor.
    try:
        copies = _host_copies(old, *args)
    except (RuntimeError, NotImplementedError):
        return
    assert copies, "the old implementation passed the no-sync check"


def test_stage_losses_run_without_reading_the_device():
    m = "meta"
    out = {"logits": torch.empty(4, 25, 3, device=m, requires_grad=True), "slice_logits": torch.empty(4, 25, 7, device=m)}
    hard = torch.empty(4, 25, dtype=torch.long, device=m)
    assert _host_copies(lambda: grader_loss(out, hard, hard, hard, 0.2, 1.0)["loss"]) == []
    cfg = OneStageConfig(slices=4, size=32)
    b, heat_shape = 2, cfg.heat_shape
    out1 = {v: {"heat": torch.empty(b, p, *heat_shape, device=m, requires_grad=True), "logits": torch.empty(b, p, 3, device=m, requires_grad=True)}
            for v, p in zip(VIEW_NAMES, cfg.model.points, strict=True)}
    batch = {"labels": torch.empty(b, 15, dtype=torch.long, device=m), "spinal_study": torch.empty(b, 15, dtype=torch.long, device=m)}
    for v, p in zip(VIEW_NAMES, cfg.model.points, strict=True):
        batch[f"coords_{v}"] = torch.empty(b, p, 3, device=m)
        batch[f"visible_{v}"] = torch.empty(b, p, dtype=torch.bool, device=m)
    assert _host_copies(lambda: onestage_loss(cfg, out1, batch)["loss"]) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_losses_do_not_synchronise_on_cuda():
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 25, 3, generator=gen).to(dev).requires_grad_(True)
    labels, study = _labels(gen, (4, 25)).to(dev), _studies(gen, 4, 25).to(dev)
    slices = torch.randn(4, 25, 7, generator=gen).to(dev).requires_grad_(True)
    heat = torch.randn(2, 5, 4, 6, 6, generator=gen).to(dev).requires_grad_(True)
    coords, vis = (torch.rand(2, 5, 3, generator=gen) * 4).to(dev), (torch.rand(2, 5, generator=gen) < 0.5).to(dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = grader_loss({"logits": logits, "slice_logits": slices}, labels, labels.clamp(max=6), study)["loss"]
        loss = loss + keypoint_loss(heat, scale_coords(coords, [1.0, 0.5, 0.5]), vis, 1.0)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
