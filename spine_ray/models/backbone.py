"""One place that turns (name, pretrained, weights) into a timm model, for both stages."""

from __future__ import annotations

from typing import Any

import timm
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
