"""One place that turns (name, pretrained, weights) into a timm model, for both stages."""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn


def check_weights(pretrained: bool, weights: str | None) -> None:
    """Config validation shared by both stages: `weights` only makes sense with pretrained=True."""
    if weights is not None and not pretrained:
        raise ValueError(f"weights={weights!r} given but pretrained=False; set pretrained=True to load them")


def create_backbone(
    name: str, pretrained: bool, weights: str | None, in_chans: int, **kwargs: Any
) -> nn.Module:
    """`timm.create_model` with optional weights from a local file or a Hugging Face hub id.

    weights=None: timm's own weights for `name` (a tag such as `convnext_small.fb_in22k_ft_in1k`
    picks them); "hf-hub:org/repo": that hub repo; anything else: a local checkpoint file
    (state dict, as saved by timm or torch.save) — the way to run without network access.
    timm adapts the stem to `in_chans` (summing RGB filters for 1 channel) and drops the
    classifier. kwargs go to timm (num_classes=0, features_only=True, drop_path_rate, …).
    """
    check_weights(pretrained, weights)
    overlay = None
    if weights is not None:
        if weights.startswith("hf-hub:"):
            overlay = {"hf_hub_id": weights.removeprefix("hf-hub:"), "source": "hf-hub"}
        else:
            overlay = {"file": weights, "source": "file"}
    return timm.create_model(
        name, pretrained=pretrained, in_chans=in_chans, pretrained_cfg_overlay=overlay, **kwargs
    )


def input_stats(model: nn.Module, in_chans: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's pretraining mean and std as [1, in_chans, 1, 1] (RGB averaged when in_chans ≠ 3).

    Both stages take [0, 1] inputs (see `spine_ray.crops.normalise_intensity`) and standardise
    them with these, so pretrained filters see the statistics they were trained on.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = torch.tensor(cfg.get("mean", IMAGENET_DEFAULT_MEAN), dtype=torch.float32)
    std = torch.tensor(cfg.get("std", IMAGENET_DEFAULT_STD), dtype=torch.float32)
    if len(mean) != in_chans:
        mean, std = mean.mean().expand(in_chans), std.mean().expand(in_chans)
    return mean.reshape(1, in_chans, 1, 1).clone(), std.reshape(1, in_chans, 1, 1).clone()
