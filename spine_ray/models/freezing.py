"""Which parameters of a timm backbone are its blocks, and freezing all but the last N of them.

"Blocks" are timm's fine-grained `group_matcher` groups, in forward order: the groups layer-wise
lr decay uses, so the split means the same thing for ResNet (one group per residual block),
ConvNeXt (each block, a stage's downsample opening its first), EfficientNet and ViT (one per
block). Group 0 is the stem. A trailing group of 1-D parameters only (ConvNeXt's `head.norm`, a
final norm) joins the block before it: it normalises that block's output, so "the last block"
trains with its own norm.

A frozen backbone keeps its batch-norm running statistics: `eval_frozen_norms` puts norm layers
whose parameters are all frozen into eval mode, and the training loop calls it after every
`model.train()`.
"""

from __future__ import annotations

from timm.models import group_parameters
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def backbone_blocks(encoder: nn.Module) -> list[list[str]]:
    """Parameter names of a timm model per block, stem first (see the module docstring)."""
    if not hasattr(encoder, "group_matcher"):
        raise ValueError(f"{type(encoder).__name__} has no group_matcher: cannot tell its blocks apart")
    groups = [list(names) for _, names in sorted(group_parameters(encoder, encoder.group_matcher(coarse=False)).items())]
    shapes = dict(encoder.named_parameters())
    if len(groups) > 2 and all(shapes[n].ndim == 1 for n in groups[-1]):
        groups[-2].extend(groups.pop())
    return groups


def freeze_backbone(encoder: nn.Module, unfreeze_last: int = 0) -> list[str]:
    """Freeze every encoder parameter except those of its last `unfreeze_last` blocks; returns the trainable names."""
    blocks = backbone_blocks(encoder)
    if not 0 <= unfreeze_last <= len(blocks):
        raise ValueError(f"unfreeze_last={unfreeze_last}: {type(encoder).__name__} has {len(blocks)} blocks (stem included)")
    trainable = {n for names in blocks[len(blocks) - unfreeze_last :] for n in names}
    for name, p in encoder.named_parameters():
        p.requires_grad_(name in trainable)
    return [n for n, _ in encoder.named_parameters() if n in trainable]


def unfreeze(module: nn.Module) -> None:
    """Every parameter of a module trains again."""
    for p in module.parameters():
        p.requires_grad_(True)


def eval_frozen_norms(model: nn.Module) -> None:
    """Batch-norm layers whose parameters are all frozen go to eval mode (running statistics stay put)."""
    for m in model.modules():
        params = list(m.parameters(recurse=False))
        if isinstance(m, _BatchNorm) and params and not any(p.requires_grad for p in params):
            m.eval()


__all__ = ["backbone_blocks", "freeze_backbone", "unfreeze", "eval_frozen_norms"]
