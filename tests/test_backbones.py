"""Transformer backbones in both stages: a tiny ViT, BEiT, Swin, PVTv2 and CAFormer through the
Localizer and the Grader at the smoke/demo sizes, impossible sizes refused at build time, and CNN
checkpoints keeping their keys."""

from __future__ import annotations

import pytest
import timm
import torch

from spine_ray.core.config import ConfigError, from_dict, to_dict
from spine_ray.models.backbone import feature_maps
from spine_ray.models.grader import Grader, GraderConfig
from spine_ray.models.heatmap import keypoint_loss
from spine_ray.models.localizer import Localizer, LocalizerConfig
from spine_ray.stages.localize import ViewConfig, view_model
from spine_ray.stages.losses import grader_loss

# name → (timm kwargs for both stages, extra localizer kwargs, grader crop side). Reduced real
# configs where timm has no test_* model. timm's caformer_* entrypoints fix depths and dims
# (passing them is a duplicate-keyword error), so CAFormer is the real S18. BEiT and the reduced
# ViT have fewer blocks than the 3 timm taps for features by default: the localizer takes the last.
# PVTv2 cannot take the smoke grader's 16 px crops (see the impossible sizes below): demo's 32.
FAMILIES = {
    "vit": ("test_vit", {}, {}, 16),
    "vit_reduced": ("vit_tiny_patch16_224", {"depth": 2, "embed_dim": 48, "num_heads": 2}, {"out_indices": 1}, 16),
    "beit": ("beit_base_patch16_224", {"depth": 1, "embed_dim": 64, "num_heads": 2}, {"out_indices": 1}, 16),
    "swin": ("swin_tiny_patch4_window7_224", {"depths": (1, 1, 1, 1), "embed_dim": 32, "num_heads": (1, 2, 4, 8)}, {}, 16),
    "pvt_v2": ("pvt_v2_b0", {"depths": (1, 1, 1, 1)}, {}, 32),
    "caformer": ("caformer_s18", {}, {}, 16),
}
LOC_SIZE = 32  # jobs/smoke.yaml localize size (out_stride 2); Swin's 8×8 grid does not divide by its 7-window: timm pads


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_runs_through_the_localizer_and_the_grader(family):
    torch.manual_seed(0)
    name, kw, loc_kw, crop = FAMILIES[family]
    loc = Localizer(LocalizerConfig(backbone=name, hidden=16, out_stride=2, backbone_kwargs={**kw, **loc_kw}), img_size=LOC_SIZE)
    x = torch.rand(1, 2, 1, LOC_SIZE, LOC_SIZE)
    # Maps are NCHW at the strides timm declares (Swin's NHWC and ViT's tokens included).
    with torch.no_grad():
        maps = feature_maps(loc.encoder, x[0])
    info = loc.encoder.feature_info
    assert [tuple(m.shape) for m in maps] == [
        (2, c, LOC_SIZE // r, LOC_SIZE // r) for c, r in zip(info.channels(), info.reduction(), strict=True)
    ]
    heat = loc(x)
    assert heat.shape == (1, 5, 2, LOC_SIZE // 2, LOC_SIZE // 2)
    loss = keypoint_loss(heat, torch.full((1, 5, 3), 4.0), torch.ones(1, 5, dtype=torch.bool), sigma=1.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in loc.encoder.parameters())

    g = Grader(GraderConfig(backbone=name, dim=16, lstm_hidden=8, backbone_kwargs=kw), img_size=crop)
    with torch.no_grad():
        out = g(torch.rand(1, 2, 5, 1, crop, crop))
    assert out["logits"].shape == (1, 2, 3) and torch.isfinite(out["logits"]).all()
    assert out["slice_attention"].shape == (1, 2, 5)


def test_a_grader_with_a_vit_trains_end_to_end():
    """Backward through the pooled ViT path: the loss reaches the patch embedding."""
    g = Grader(GraderConfig(backbone="test_vit", dim=16, lstm_hidden=8, level_embedding=True), img_size=16)
    out = g(torch.rand(2, 5, 3, 1, 16, 16), level=torch.arange(5).repeat(2, 1))
    grader_loss(out, torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long),
                torch.zeros(2, 5, dtype=torch.long))["loss"].backward()
    assert g.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("build", "match"), [
    # Swin's 4-pixel patches do not tile a 30-pixel side.
    (lambda: view_model("sag_t2", ViewConfig(model=LocalizerConfig(
        backbone="swin_tiny_patch4_window7_224", backbone_kwargs={"depths": [1, 1, 1, 1], "embed_dim": 32}), size=30)),
     "'swin_tiny_patch4_window7_224' cannot take 30×30"),
    # PVTv2's first spatial-reduction kernel (8) is wider than a 16-pixel crop's stride-4 grid.
    (lambda: Grader(GraderConfig(backbone="pvt_v2_b0", backbone_kwargs={"depths": [1, 1, 1, 1]}), img_size=16),
     "'pvt_v2_b0' cannot take 16×16"),
    (lambda: Grader(GraderConfig(backbone="test_vit"), img_size=24), "'test_vit' cannot take 24×24"),
    # Two blocks, and timm taps the last three for features unless told out_indices.
    (lambda: Localizer(LocalizerConfig(backbone="vit_tiny_patch16_224", backbone_kwargs={"depth": 2}), img_size=32),
     "cannot build backbone 'vit_tiny_patch16_224'"),
    (lambda: Grader(GraderConfig(backbone="test_resnet", backbone_kwargs={"depht": 2}), img_size=16),
     "cannot build backbone 'test_resnet'"),
], ids=["swin-patch", "pvt-too-small", "vit-patch", "vit-too-few-blocks", "unknown-kwarg"])
def test_impossible_backbone_and_size_fail_at_build_with_one_line(build, match):
    with pytest.raises(ValueError, match=match) as e:
        build()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("name", "cnn"), [("resnet10t", "loc"), ("test_convnext", "loc"), ("test_resnet", "grade"),
                                           ("test_efficientnet", "grade")])
def test_cnn_state_dict_keys_are_timms_own(name, cnn):
    """Checkpoints written before transformer support still load: CNN encoders are timm's modules as before."""
    if cnn == "loc":
        ours = Localizer(LocalizerConfig(backbone=name, hidden=8), img_size=32).encoder
        ref = timm.create_model(name, pretrained=False, in_chans=1, features_only=True)
    else:
        ours = Grader(GraderConfig(backbone=name, dim=16, lstm_hidden=8), img_size=16).encoder
        ref = timm.create_model(name, pretrained=False, in_chans=1, num_classes=0)
    assert list(ours.state_dict()) == list(ref.state_dict())


def test_backbone_kwargs_come_from_yaml_and_old_configs_still_load():
    cfg = from_dict(GraderConfig, {"backbone": "swin_tiny_patch4_window7_224",
                                   "backbone_kwargs": {"depths": [1, 1, 1, 1], "embed_dim": 32}})
    assert cfg.backbone_kwargs == {"depths": [1, 1, 1, 1], "embed_dim": 32}
    assert from_dict(GraderConfig, to_dict(cfg)) == cfg
    assert from_dict(LocalizerConfig, {"backbone": "resnet10t"}).backbone_kwargs == {}  # a config from before
    with pytest.raises(ConfigError, match="backbone_kwargs"):
        from_dict(LocalizerConfig, {"backbone_kwargs": [1, 2]})
