"""Stage-1 localizer and stage-2 grader: shapes, switches, gradients, weights, and that they learn."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import timm
import torch

from spine_ray.core.config import ConfigError, from_dict, to_dict
from spine_ray.data.crops import crop_stack, resample_volume, stack_slices, to_native
from spine_ray.models.grader import Grader, GraderConfig
from spine_ray.models.heatmap import decode_points, keypoint_loss, scale_coords
from spine_ray.models.localizer import Localizer, LocalizerConfig
from spine_ray.stages.losses import grader_loss, severity_loss, slice_loss

TINY = ("test_resnet", "resnet10t", "test_convnext")
REAL = ("convnext_small.fb_in22k_ft_in1k", "tf_efficientnet_b3.ns_jft_in1k")


def small_grader(**kw) -> GraderConfig:
    return GraderConfig(**{"backbone": "test_resnet", "dim": 32, "lstm_hidden": 16, **kw})


def grads_reach(model: torch.nn.Module, prefix: str) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith(prefix))


# ---------------------------------------------------------------- localizer


@pytest.mark.parametrize("backbone", TINY)
@pytest.mark.parametrize("context", ["conv", "gru", "none"])
def test_localizer_shapes_and_backward(backbone, context):
    torch.manual_seed(0)
    m = Localizer(LocalizerConfig(backbone=backbone, n_points=5, hidden=16, context=context))
    x = torch.randn(2, 8, 1, 64, 64)
    logits = m(x)
    assert logits.shape == (2, 5, 8, 16, 16)
    target = torch.tensor([[2.0, 20.0, 30.0]]).expand(2, 5, 3)
    hm_target = scale_coords(target, [1 / s for s in m.stride])
    loss = keypoint_loss(logits, hm_target, torch.ones(2, 5, dtype=torch.bool), sigma=1.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert grads_reach(m, "encoder") and grads_reach(m, "head")
    if context != "none":
        assert grads_reach(m, "context")


@pytest.mark.parametrize(("n_points", "slices", "stride"), [(10, 8, 4), (2, 5, 8), (5, 6, 2)])
def test_localizer_views_and_strides(n_points, slices, stride):
    m = Localizer(LocalizerConfig(backbone="resnet10t", n_points=n_points, hidden=8, out_stride=stride))
    with torch.no_grad():
        logits = m(torch.randn(1, slices, 1, 64, 48))
    assert logits.shape == (1, n_points, slices, 64 // stride, 48 // stride)
    coords, conf = decode_points(logits)
    assert coords.shape == (1, n_points, 3) and conf.shape == (1, n_points)
    # Decoded heatmap coordinates map back inside the input volume.
    native = scale_coords(coords, m.stride)
    assert (native >= -0.5).all() and (native[..., 1] <= 63.5).all() and (native[..., 2] <= 47.5).all()


def test_localizer_learns_a_point():
    torch.manual_seed(0)
    x = torch.zeros(4, 4, 1, 32, 32)
    pts = torch.tensor([[1, 8, 8], [2, 20, 12], [3, 24, 24], [0, 12, 28]], dtype=torch.float32)
    for i, (s, r, c) in enumerate(pts.long().tolist()):
        x[i, s, 0, r - 1 : r + 2, c - 1 : c + 2] = 1.0
    m = Localizer(LocalizerConfig(backbone="test_resnet", n_points=1, hidden=16, out_stride=4))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    target = scale_coords(pts[:, None], [1 / s for s in m.stride])
    vis = torch.ones(4, 1, dtype=torch.bool)
    for _ in range(60):
        loss = keypoint_loss(m(x), target, vis, sigma=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        coords, _ = decode_points(m(x))
    err = (scale_coords(coords, m.stride) - pts[:, None]).abs()
    assert err[..., 0].max() < 0.75 and err[..., 1:].max() < 4.0


def test_localizer_rejects_bad_input_and_config():
    m = Localizer(LocalizerConfig(backbone="test_resnet", hidden=8))
    with pytest.raises(ValueError):
        m(torch.randn(1, 8, 64, 64))
    with pytest.raises(ValueError, match="multiples"):
        m(torch.randn(1, 8, 1, 66, 64))
    with pytest.raises(ValueError):
        LocalizerConfig(out_stride=3)
    with pytest.raises(ValueError):
        LocalizerConfig(weights="/x.pth")  # weights without pretrained=True
    with pytest.raises(dataclasses.FrozenInstanceError):
        LocalizerConfig().n_points = 3  # type: ignore[misc]


# ---------------------------------------------------------------- grader


@pytest.mark.parametrize("backbone", TINY)
def test_grader_shapes_attention_and_aux_head(backbone):
    m = Grader(small_grader(backbone=backbone))
    out = m(torch.randn(2, 5, 5, 1, 32, 32))
    assert out["logits"].shape == (2, 5, 3)
    assert out["slice_logits"].shape == out["slice_attention"].shape == (2, 5, 5)
    assert torch.allclose(out["slice_attention"].sum(-1), torch.ones(2, 5))
    # The aux slice loss alone trains the attention and, through it, the encoder.
    slice_loss(out["slice_logits"], torch.full((2, 5), 2)).backward()
    assert grads_reach(m, "attention") and grads_reach(m, "encoder") and grads_reach(m, "lstm")
    assert not grads_reach(m, "head")


SWITCHES = [
    {},
    {"level_embedding": True},
    {"condition_embedding": True},
    {"n_views": 3},
    {"target_mixer": "transformer"},
    {"target_mixer": "gru"},
    {"level_embedding": True, "condition_embedding": True, "n_views": 2, "target_mixer": "transformer",
     "lstm_layers": 2, "mixer_layers": 2},
]


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: "+".join(s) or "plain")
def test_grader_every_switch_runs_backward(switches):
    torch.manual_seed(0)
    cfg = small_grader(**switches)
    m = Grader(cfg)
    b, t = 2, 5
    level = torch.tensor([[3] * t, [4] * t])
    condition = torch.arange(t).repeat(b, 1)
    view = torch.tensor([[0, 1, 1, 2, 2]] * b) % cfg.n_views
    out = m(torch.randn(b, t, 5, 1, 32, 32), level=level, condition=condition, view=view)
    labels = torch.tensor([[0, 1, 2, -1, 0], [2, 0, 0, 1, 1]])
    parts = grader_loss(out, labels, torch.full((b, t), 2), torch.tensor([[0, -1, -1, -1, -1], [1, -1, -1, -1, -1]]))
    parts["loss"].backward()
    for name in ("encoder", "lstm", "attention", "head"):
        assert grads_reach(m, name), name
    for flag, name in (("level_embedding", "level"), ("condition_embedding", "condition"),
                       ("n_views", "view"), ("target_mixer", "mixer")):
        if switches.get(flag):
            assert grads_reach(m, name), name


def test_grader_embeddings_change_the_output_and_are_required():
    m = Grader(small_grader(level_embedding=True, condition_embedding=True)).eval()
    x = torch.randn(1, 2, 5, 1, 32, 32)
    x[:, 1] = x[:, 0]
    cond = torch.tensor([[0, 0]])
    with torch.no_grad():
        same = m(x, level=torch.tensor([[1, 1]]), condition=cond)["logits"]
        diff = m(x, level=torch.tensor([[1, 4]]), condition=cond)["logits"]
    assert torch.allclose(same[0, 0], same[0, 1], atol=1e-6)
    assert not torch.allclose(diff[0, 0], diff[0, 1], atol=1e-4)
    with pytest.raises(ValueError, match="level"):
        m(x, condition=cond)


def test_target_mixer_mixes_targets_and_respects_the_padding_mask():
    torch.manual_seed(0)
    m = Grader(small_grader(target_mixer="transformer", dropout=0.0)).eval()
    x = torch.randn(1, 3, 5, 1, 32, 32)
    y = x.clone()
    y[:, 2] = torch.randn(5, 1, 32, 32)  # change only target 2
    mask = torch.tensor([[True, True, False]])
    with torch.no_grad():
        a, b = m(x)["logits"], m(y)["logits"]
        am, bm = m(x, target_mask=mask)["logits"], m(y, target_mask=mask)["logits"]
    assert not torch.allclose(a[0, 0], b[0, 0], atol=1e-5)  # targets see each other
    assert torch.allclose(am[0, :2], bm[0, :2], atol=1e-5)  # but not a padded one


@pytest.mark.parametrize("backbone", REAL)
def test_realistic_backbones_build_and_run(backbone):
    g = Grader(GraderConfig(backbone=backbone, pretrained=False, level_embedding=True, target_mixer="transformer"))
    loc = Localizer(LocalizerConfig(backbone=backbone, pretrained=False, n_points=10))
    with torch.no_grad():
        assert g(torch.randn(1, 2, 2, 1, 64, 64), level=torch.zeros(1, 2))["logits"].shape == (1, 2, 3)
        assert loc(torch.randn(1, 2, 1, 64, 64)).shape == (1, 10, 2, 16, 16)


def test_weights_from_a_local_file(tmp_path):
    src = timm.create_model("test_resnet", pretrained=False)  # RGB, 1000 classes, as published
    path = tmp_path / "test_resnet.pth"
    torch.save(src.state_dict(), path)
    sd = src.state_dict()
    g = Grader(small_grader(pretrained=True, weights=str(path)))
    loc = Localizer(LocalizerConfig(backbone="test_resnet", pretrained=True, weights=str(path), hidden=8))
    for enc in (g.encoder.state_dict(), loc.encoder.state_dict()):
        assert torch.equal(enc["layer1.0.conv1.weight"], sd["layer1.0.conv1.weight"])
        # One input channel: timm sums the RGB stem filters.
        assert torch.allclose(enc["conv1.0.weight"], sd["conv1.0.weight"].sum(1, keepdim=True))
    fresh = Grader(small_grader())
    assert not torch.equal(fresh.encoder.state_dict()["layer1.0.conv1.weight"], sd["layer1.0.conv1.weight"])


def test_grader_overfits_bright_squares():
    """8 samples whose severity is the size of a bright square: ~zero loss within 60 steps."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    sev = torch.tensor([0, 1, 2, 0, 1, 2, 2, 0])
    x = 0.1 * torch.rand(8, 1, 3, 1, 32, 32, generator=gen)
    for i, s in enumerate(sev.tolist()):
        half = (2, 5, 9)[s]
        r, c = torch.randint(10, 22, (2,), generator=gen).tolist()
        x[i, 0, 1, 0, max(r - half, 0) : r + half, max(c - half, 0) : c + half] = 1.0  # on the middle slice
    model = Grader(small_grader(dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    slice_target = torch.ones(8, 1, dtype=torch.long)
    first = None
    for _ in range(60):
        out = model(x)
        loss = severity_loss(out["logits"], sev[:, None]) + 0.2 * slice_loss(out["slice_logits"], slice_target)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = model(x)
    assert first > 0.8
    assert severity_loss(out["logits"], sev[:, None]).item() < 0.05
    assert out["logits"][:, 0].argmax(-1).tolist() == sev.tolist()
    assert (out["slice_attention"][:, 0].argmax(-1) == 1).all()


@pytest.mark.parametrize("make", [
    lambda **kw: Grader(small_grader(dropout=0.0, **kw)),
    lambda **kw: Localizer(LocalizerConfig(backbone="test_resnet", hidden=8, **kw)),
], ids=["grader", "localizer"])
def test_grad_checkpointing_gives_the_same_gradients(make):
    torch.manual_seed(0)
    plain = make()
    ckpt = make(grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.rand(2, 1, 3, 1, 32, 32) if isinstance(plain, Grader) else torch.rand(2, 3, 1, 32, 32)
    for m in (plain, ckpt):
        out = m(x)
        (out["logits"] if isinstance(out, dict) else out).square().sum().backward()
    a = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():
        if a[name].grad is not None:
            assert torch.allclose(p.grad, a[name].grad, atol=1e-5, rtol=1e-4), name


def test_inputs_are_standardised_with_the_backbone_stats():
    g = Grader(small_grader())  # test_resnet was trained with mean = std = 0.5
    assert g.mean.flatten().tolist() == [0.5] and g.std.flatten().tolist() == [0.5]
    loc = Localizer(LocalizerConfig(backbone="convnext_small.fb_in22k_ft_in1k", in_chans=3, hidden=8))
    assert torch.allclose(loc.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    one = Localizer(LocalizerConfig(backbone="convnext_small.fb_in22k_ft_in1k", hidden=8))
    assert one.mean.item() == pytest.approx((0.485 + 0.456 + 0.406) / 3)
    # Off: a constant shift of the input changes the output; on, it is the same as shifting stats.
    raw = Grader(small_grader(normalise_input=False)).eval()
    raw.load_state_dict(g.state_dict())
    g.eval()
    x = torch.rand(1, 1, 2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(g(x)["logits"], raw((x - 0.5) / 0.5)["logits"], atol=1e-5)


def test_configs_load_through_the_project_loader():
    cfg = from_dict(GraderConfig, {"backbone": "test_resnet", "target_mixer": "gru", "n_views": 3})
    assert cfg.target_mixer == "gru" and from_dict(GraderConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError):
        from_dict(GraderConfig, {"target_mixer": "lstm"})
    with pytest.raises(ConfigError):
        from_dict(LocalizerConfig, {"out_stride": 3})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_both_stages_train_a_step_on_cuda_under_autocast():
    dev = torch.device("cuda")
    loc = Localizer(LocalizerConfig(backbone="resnet10t", n_points=5, hidden=16)).to(dev)
    g = Grader(small_grader(level_embedding=True, target_mixer="transformer")).to(dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        heat = loc(torch.rand(2, 8, 1, 64, 64, device=dev))
        kl = keypoint_loss(heat, torch.full((2, 5, 3), 4.0, device=dev), torch.ones(2, 5, dtype=torch.bool, device=dev), 1.0)
        out = g(torch.rand(2, 5, 5, 1, 32, 32, device=dev), level=torch.zeros(2, 5, dtype=torch.long, device=dev))
        gl = grader_loss(out, torch.zeros(2, 5, dtype=torch.long, device=dev),
                         torch.full((2, 5), 2, device=dev), torch.zeros(2, 5, dtype=torch.long, device=dev))
    (kl + gl["loss"]).backward()
    assert torch.isfinite(kl) and torch.isfinite(gl["loss"])


def test_slice_mask_keeps_attention_off_missing_slices():
    m = Grader(small_grader())
    mask = torch.tensor([[[False, False, True, True, True], [True, True, True, True, False]]])
    out = m(torch.rand(1, 2, 5, 1, 32, 32), slice_mask=mask)
    assert out["slice_attention"][~mask].max() < 1e-6
    assert torch.allclose(out["slice_attention"].sum(-1), torch.ones(1, 2))
    loss = slice_loss(out["slice_logits"], torch.tensor([[0, 2]]))  # even a target on a masked slice
    loss.backward()
    assert torch.isfinite(loss)


def test_the_two_stages_fit_together():
    """Native volume → resample → localizer → native points → mm crops → grader → losses."""
    rng = np.random.default_rng(0)
    native = rng.normal(500, 100, size=(15, 96, 80)).astype(np.float32)  # a sagittal T2 series
    spacing = (0.6, 0.7)
    window = tuple(float(v) for v in np.percentile(native, [1.0, 99.0]))  # as ingest's intensity_p01/p99
    vol, scale = resample_volume(native, (8, 64, 64))
    loc = Localizer(LocalizerConfig(backbone="test_resnet", n_points=5, hidden=8)).eval()
    with torch.no_grad():
        x = torch.from_numpy((vol - window[0]) / (window[1] - window[0])).clip(0, 1)[None, :, None]
        coords, conf = decode_points(loc(x))  # [1, 5, 3] heatmap voxels
    points = to_native(scale_coords(coords, loc.stride)[0].numpy(), scale)  # [5, 3] native
    assert points.shape == (5, 3) and (points[:, 0] > -0.5).all() and (points[:, 0] < 14.5).all()
    crops = np.stack([crop_stack(native, spacing, p, size_mm=30, out_px=32, k=2, window=window) for p in points])
    masks = np.stack([stack_slices(native.shape[0], p[0], 2)[1] for p in points])
    g = Grader(small_grader(level_embedding=True))
    out = g(torch.from_numpy(crops)[None, :, :, None], level=torch.arange(5)[None],
            slice_mask=torch.from_numpy(masks)[None])  # one study, T = 5 levels
    parts = grader_loss(out, torch.tensor([[0, 1, 2, 0, -1]]), torch.full((1, 5), 2), torch.zeros(1, 5, dtype=torch.long))
    parts["loss"].backward()
    assert out["logits"].shape == (1, 5, 3) and torch.isfinite(parts["loss"])


def test_create_backbone_passes_hub_ids_and_files_to_timm(monkeypatch):
    from spine_ray.models import backbone

    seen = {}
    monkeypatch.setattr(backbone.timm, "create_model", lambda name, **kw: seen.update(name=name, **kw))
    backbone.create_backbone("convnext_small", True, "hf-hub:timm/convnext_small.fb_in22k_ft_in1k", 1, num_classes=0)
    assert seen["pretrained_cfg_overlay"] == {"hf_hub_id": "timm/convnext_small.fb_in22k_ft_in1k", "source": "hf-hub"}
    assert seen["pretrained"] and seen["in_chans"] == 1 and seen["num_classes"] == 0
    backbone.create_backbone("convnext_small", True, "/ckpt/convnext.safetensors", 1)
    assert seen["pretrained_cfg_overlay"] == {"file": "/ckpt/convnext.safetensors", "source": "file"}
    backbone.create_backbone("convnext_small.fb_in22k_ft_in1k", True, None, 1)
    assert seen["pretrained_cfg_overlay"] is None  # timm's own weights for the tag
    with pytest.raises(ValueError, match="pretrained=False"):
        backbone.create_backbone("convnext_small", False, "/ckpt/x.pth", 1)


# --- GPU speed-ups of the 2-D backbones (applied on CUDA by the fold driver) -----------------


def _speed_models() -> dict[str, torch.nn.Module]:
    from spine_ray.models.onestage import OneStageNet, OneStageNetConfig

    torch.manual_seed(0)
    loc = LocalizerConfig(backbone="test_resnet", hidden=8, out_stride=2)
    return {
        "grader": Grader(GraderConfig(backbone="test_resnet", dim=16, lstm_hidden=8, target_mixer="transformer"), img_size=16),
        "localizer": Localizer(loc, img_size=32),
        "onestage": OneStageNet(OneStageNetConfig(net=loc), img_size=32),
    }


def test_speed_ups_find_only_the_2d_backbones():
    from spine_ray.models.backbone import backbones

    m = _speed_models()
    assert backbones(m["grader"]) == [m["grader"].encoder]  # not the transformer mixer's `encoder`
    assert backbones(m["localizer"]) == [m["localizer"].encoder]
    assert len(backbones(m["onestage"])) == 2  # one localiser per view


def test_channels_last_keeps_names_and_outputs_and_spares_the_3d_convolutions():
    from spine_ray.models.backbone import speed_up

    m = _speed_models()["localizer"].eval()
    x = torch.randn(2, 8, 1, 32, 32)
    with torch.no_grad():
        before, keys = m(x), list(m.state_dict())
    assert speed_up(m, channels_last=True, compile_backbone=False) == ["channels_last"]
    convs = [p for n, p in m.encoder.named_parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    with torch.no_grad():
        assert torch.allclose(m(x), before, atol=1e-5)  # the 3-D context convolutions run as before
    assert list(m.state_dict()) == keys


def test_compile_is_in_place_so_weights_keep_their_names(monkeypatch):
    from spine_ray.models.backbone import speed_up

    m = _speed_models()["grader"]
    keys = list(m.state_dict())
    compiled: list[tuple[torch.nn.Module, dict]] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append((self, k)))
    assert speed_up(m, channels_last=False, compile_backbone=True) == ["compile"]
    assert compiled == [(m.encoder, {"dynamic": False})] and list(m.state_dict()) == keys  # one static graph per batch shape
    assert speed_up(m, channels_last=False, compile_backbone=False) == []


def test_compiled_encoders_keep_static_kernels_for_the_full_batch_and_start_each_job_afresh(monkeypatch):
    """Real Dynamo (a recording backend in place of Inductor): after an epoch's short last batch the full
    batches still run the graph made for their size, and the next model compiled starts with no graphs."""
    import spine_ray.models.backbone as bb

    graphs: list[dict] = []

    def record(gm, example_inputs):
        sizes = [d for x in example_inputs for d in (x.shape if isinstance(x, torch.Tensor) else [x])]
        g = {"calls": 0, "dynamic": any(isinstance(d, torch.SymInt) for d in sizes)}
        graphs.append(g)

        def run(*args):
            g["calls"] += 1
            return gm.forward(*args)
        return run

    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: original(self, backend=record, **kw))
    monkeypatch.setattr(bb, "backbones", lambda model: [model])

    def net() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    try:
        m = net()
        assert bb.speed_up(m, channels_last=False, compile_backbone=True) == ["compile"]
        for b in (4, 3, 4, 4, 4):  # full batches, the epoch's short one, the next epoch's
            m(torch.randn(b, 3, 8, 8))
        assert [g["dynamic"] for g in graphs] == [False, False]
        assert [g["calls"] for g in graphs] == [4, 1]  # by default: [1, 4], the full batches on the dynamic graph
        m2 = net()
        bb.speed_up(m2, channels_last=False, compile_backbone=True)
        m2(torch.randn(4, 3, 8, 8))
        assert len(graphs) == 3 and graphs[2]["calls"] == 1  # compiled anew, not the last job's graph
    finally:
        torch._dynamo.reset()


def test_speed_up_sets_the_cudnn_autotuner_either_way():
    from spine_ray.models.backbone import speed_up

    m = _speed_models()["grader"]
    try:
        assert speed_up(m, channels_last=False, compile_backbone=False, cudnn_benchmark=True) == ["cudnn_benchmark"]
        assert torch.backends.cudnn.benchmark is True
        assert speed_up(m, channels_last=False, compile_backbone=False) == []  # the next member's own setting: off
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = False
