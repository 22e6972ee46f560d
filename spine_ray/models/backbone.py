"""One place that turns a timm name into an encoder for both stages, CNN or transformer.

The grader wants pooled features [N, D]; the localizer wants NCHW feature maps at known strides.
`create_backbone` builds either from any timm name: `num_classes=0` gives pooled features for every
family (ViT's class token or mean, Swin's NHWC average, CNN global pooling); `features_only=True`
gives maps, which `feature_maps` returns as NCHW whatever the family (Swin's come as NHWC;
ViT/BEiT/EVA patch tokens come back as a grid at the patch stride, prefix tokens dropped, through
timm's `forward_intermediates`). Families built for one input size (ViT, DeiT, BEiT, EVA, Swin)
are built for the stage's crop or volume size, and with `dynamic_img_size=True` where the family
supports it; `check_input_size` runs one probe so an impossible name/size pair fails with a
one-line ValueError when the model is built, not in the middle of training.

`BackboneConfig` holds the encoder settings both stages share and `build_encoder` turns it into
the encoder and its input statistics; `GraderConfig` and `LocalizerConfig` extend it.
"""

from __future__ import annotations

import inspect
import logging
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

# What timm raises for kwargs a family does not take (TypeError) or cannot honour (assertions).
# Not RuntimeError: weights that do not fit keep torch's own message.
log = logging.getLogger(__name__)

_BUILD_ERRORS = (TypeError, ValueError, AssertionError)
# What a forward raises for an input side the backbone cannot take (conv kernels are RuntimeErrors).
_INPUT_ERRORS = (TypeError, ValueError, AssertionError, RuntimeError)


def check_weights(pretrained: bool, weights: str | None) -> None:
    """Config validation shared by both stages: `weights` only makes sense with pretrained=True."""
    if weights is not None and not pretrained:
        raise ValueError(f"weights={weights!r} given but pretrained=False; set pretrained=True to load them")


@dataclass(frozen=True)
class BackboneConfig:
    """The timm encoder settings of both stages: which backbone, its weights and how it takes its input.

    Stage configs subclass it rather than nest it, so its fields stay at the top level of a stage's
    `model:` mapping: YAML in jobs/, and the configs saved in old run dirs and model.pt files, load as is.
    """

    backbone: str = "convnext_small.fb_in22k_ft_in1k"
    in_chans: int = 1
    pretrained: bool = False
    weights: str | None = None
    # Extra timm constructor kwargs, e.g. {depth: 2}, {window_size: 8} or (maps) {out_indices: 1}; see README "Backbones".
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    normalise_input: bool = True  # standardise [0, 1] input with the backbone's mean/std
    # Trade compute for memory in the encoder: timm's activation checkpointing keeps each block's
    # input and runs its forward again in backward (same gradients). "auto": on where a fold job's
    # share of its GPU has less than AUTO_CHECKPOINT_BELOW_GIB (A10G, L4, T4, or a quarter of an
    # H100), off on a whole A100-80/H100/H200 and on CPU (`resolve_checkpointing`).
    grad_checkpointing: bool | Literal["auto"] = False

    def __post_init__(self) -> None:
        check_weights(self.pretrained, self.weights)
        if self.grad_checkpointing not in (True, False, "auto"):
            raise ValueError(f"grad_checkpointing must be true, false or 'auto', got {self.grad_checkpointing!r}")


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def model_class(name: str) -> type | None:
    """The class timm builds for `name` (its entrypoint's return annotation), None when timm does not say."""
    try:
        cls = typing.get_type_hints(timm.models.model_entrypoint(name)).get("return")
    except (KeyError, RuntimeError, NameError, TypeError):
        # A hub or local-dir name, or an annotation that does not resolve: timm builds it as is,
        # and reports an unknown name itself.
        return None
    return cls if isinstance(cls, type) else None


def _init_params(cls: type | None) -> set[str]:
    """Keyword names a model class's constructor takes, following **kwargs up to its bases (DeiT-distilled)."""
    names: set[str] = set()
    for klass in cls.__mro__ if cls is not None else ():
        if klass is nn.Module:
            break
        params = inspect.signature(klass.__init__).parameters
        names |= {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return names


def size_kwargs(name: str, img_size: int | None) -> dict[str, Any]:
    """`img_size` (and `dynamic_img_size=True`) for families whose constructor takes them; {} for the rest.

    ViT/BEiT/EVA position embeddings and Swin attention masks are sized at construction; CNNs,
    PVTv2 and MetaFormer (CAFormer, ConvFormer) take any size and get nothing.
    """
    params = _init_params(model_class(name))
    out: dict[str, Any] = {}
    if img_size is not None and "img_size" in params:
        out["img_size"] = img_size
    if "dynamic_img_size" in params:
        # Inputs at another size still run (position embeddings resampled, Swin masks rebuilt).
        out["dynamic_img_size"] = True
    return out


def create_backbone(
    name: str, pretrained: bool, weights: str | None, in_chans: int, img_size: int | None = None, **kwargs: Any
) -> nn.Module:
    """`timm.create_model` for any timm name, with optional weights from a local file or a Hugging Face hub id.

    weights=None: timm's own weights for `name` (a tag such as `convnext_small.fb_in22k_ft_in1k`
    picks them); "hf-hub:org/repo": that hub repo; anything else: a local checkpoint file
    (state dict, as saved by timm or torch.save) — the way to run without network access.
    timm adapts the stem to `in_chans` (summing RGB filters for 1 channel) and drops the
    classifier. `img_size` is the stage's input side, given to the families that need it
    (`size_kwargs`). kwargs go to timm (num_classes=0, features_only=True, drop_path_rate, a
    config's backbone_kwargs such as depth=2, …) and win over the size defaults.
    """
    check_weights(pretrained, weights)
    overlay = None
    if weights is not None:
        if weights.startswith("hf-hub:"):
            overlay = {"hf_hub_id": weights.removeprefix("hf-hub:"), "source": "hf-hub"}
        else:
            overlay = {"file": weights, "source": "file"}
    kwargs = {**size_kwargs(name, img_size), **kwargs}
    try:
        return timm.create_model(
            name, pretrained=pretrained, in_chans=in_chans, pretrained_cfg_overlay=overlay, **kwargs
        )
    except _BUILD_ERRORS as e:
        # A kwarg the family does not take, or too few blocks for timm's default feature taps.
        raise ValueError(f"timm cannot build backbone {name!r} with {kwargs}: {_one_line(e)}") from None


def feature_maps(encoder: nn.Module, x: Tensor) -> list[Tensor]:
    """A `features_only` encoder's maps for x [N, C, H, W], each NCHW [N, C_i, H/r_i, W/r_i]."""
    maps = encoder(x)
    if getattr(encoder, "output_fmt", "NCHW") == "NHWC":  # Swin-style stages keep channels last
        maps = [m.permute(0, 3, 1, 2) for m in maps]
    return list(maps)


def _inner(encoder: nn.Module) -> nn.Module:
    """The timm model itself: getter-style feature nets (ViT, BEiT, EVA) wrap it as `.model`."""
    return encoder if hasattr(encoder, "set_grad_checkpointing") else getattr(encoder, "model", encoder)


def set_grad_checkpointing(encoder: nn.Module, enable: bool) -> None:
    """Turn timm's activation checkpointing on or off, for plain models and feature nets alike."""
    _inner(encoder).set_grad_checkpointing(enable)


# `grad_checkpointing: auto` checkpoints where a fold job's GPU memory is under this. On an H200 the
# recipe's units peak at 7-15 GiB, the one-stage member at 10.6 with checkpointing; without it, at
# its batch of 4, it keeps 19 GiB more for backward (benchmarks/checkpointing.py), ≈ 30 GiB in all,
# as two views of the sagittal localiser (the same network, 14.1 GiB for one) suggest.
AUTO_CHECKPOINT_BELOW_GIB = 40.0


def checkpointing_wanted(setting: bool | str, device_type: str, device_gib: float, gpu_share: float = 1.0) -> bool:
    """What a `grad_checkpointing` setting means for a job on a device of `device_type` with `device_gib` of memory, `gpu_share` of it its own (pure)."""
    if setting != "auto":
        return bool(setting)
    if device_type != "cuda":
        return False  # CPU: host memory; checkpointing would only cost time
    return device_gib * gpu_share < AUTO_CHECKPOINT_BELOW_GIB


def checkpointing_of(model: nn.Module) -> list[bool]:
    """Whether timm checkpoints each 2-D encoder of a model (`backbones` order)."""
    return [bool(getattr(_inner(e), "grad_checkpointing", False)) for e in backbones(model)]


def resolve_checkpointing(model: nn.Module, device: torch.device, gpu_share: float = 1.0) -> bool | None:
    """Settle `grad_checkpointing: auto` for a model about to train on `device`: every encoder built with it, on or off
    (`checkpointing_wanted`); returns what was chosen, None when no encoder asked."""
    chosen = None
    for enc in backbones(model):
        if getattr(enc, AUTO_MARK, False):
            gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 0.0
            chosen = checkpointing_wanted("auto", device.type, gib, gpu_share)
            set_grad_checkpointing(enc, chosen)
    if chosen is not None:
        log.info("grad_checkpointing auto: %s on %s (share %.2f)", "on" if chosen else "off", device, gpu_share)
    return chosen


def check_input_size(encoder: nn.Module, name: str, in_chans: int, img_size: int, maps: bool) -> None:
    """One probe at [1, in_chans, img_size, img_size]; ValueError naming the backbone and size if it cannot run.

    Catches what only shows at run time: a side that is not a multiple of the patch size (ViT,
    Swin), or one too small for a spatial-reduction kernel (PVTv2) or a downsampling stage (ConvNeXt).
    """
    was_training = encoder.training
    encoder.eval()  # batch of one: BatchNorm must not use batch statistics
    try:
        with torch.no_grad():
            x = torch.zeros(1, in_chans, img_size, img_size, device=next(encoder.parameters(), torch.empty(0)).device)
            out = feature_maps(encoder, x) if maps else [encoder(x)]
    except _INPUT_ERRORS as e:
        raise ValueError(f"backbone {name!r} cannot take {img_size}×{img_size} inputs: {_one_line(e)}") from None
    finally:
        encoder.train(was_training)
    if any(o.numel() == 0 for o in out):
        raise ValueError(f"backbone {name!r} cannot take {img_size}×{img_size} inputs: a feature map is empty")


def input_stats(model: nn.Module, in_chans: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's pretraining mean and std as [1, in_chans, 1, 1] (RGB averaged when in_chans ≠ 3).

    Both stages take [0, 1] inputs (see `spine_ray.data.crops.normalise_intensity`) and standardise
    them with these, so pretrained filters see the statistics they were trained on.
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(_inner(model), "pretrained_cfg", None) or {}
    mean = torch.tensor(cfg.get("mean", IMAGENET_DEFAULT_MEAN), dtype=torch.float32)
    std = torch.tensor(cfg.get("std", IMAGENET_DEFAULT_STD), dtype=torch.float32)
    if len(mean) != in_chans:
        mean, std = mean.mean().expand(in_chans), std.mean().expand(in_chans)
    return mean.reshape(1, in_chans, 1, 1).clone(), std.reshape(1, in_chans, 1, 1).clone()


def build_encoder(
    cfg: BackboneConfig, img_size: int | None, maps: bool, **kwargs: Any
) -> tuple[nn.Module, Tensor, Tensor]:
    """The config's encoder (feature maps if `maps`, else pooled features) with its input mean and std [1, C, 1, 1].

    img_size: the stage's input side; the encoder is built for it and probed once
    (`check_input_size`). kwargs (e.g. drop_path_rate) go to timm before the config's
    backbone_kwargs; a key in both is a TypeError.
    """
    head: dict[str, Any] = {"features_only": True} if maps else {"num_classes": 0}
    encoder = create_backbone(
        cfg.backbone, cfg.pretrained, cfg.weights, cfg.in_chans, img_size, **head, **kwargs, **cfg.backbone_kwargs
    )
    if img_size is not None:
        check_input_size(encoder, cfg.backbone, cfg.in_chans, img_size, maps=maps)
    # "auto" builds without; the fold driver settles it for its device (`resolve_checkpointing`).
    set_grad_checkpointing(encoder, cfg.grad_checkpointing is True)
    setattr(encoder, AUTO_MARK, cfg.grad_checkpointing == "auto")
    mean, std = input_stats(encoder, cfg.in_chans)
    setattr(encoder, BACKBONE_MARK, True)  # what `speed_up` finds: the 2-D timm encoders, nothing 3-D
    return encoder, mean, std


BACKBONE_MARK = "_spine_ray_backbone"
AUTO_MARK = "_spine_ray_checkpointing_auto"


def backbones(model: nn.Module) -> list[nn.Module]:
    """The 2-D timm encoders inside a model (built by `build_encoder`), outermost first."""
    return [m for m in model.modules() if getattr(m, BACKBONE_MARK, False)]


def _channels_last_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def speed_up(model: nn.Module, channels_last: bool, compile_backbone: bool, cudnn_benchmark: bool = False) -> list[str]:
    """Channels-last memory and torch.compile for a model's 2-D backbones, in place, and cuDNN's autotuner
    set for the process (on or off, so members trained one after another each get their own); returns what was applied.

    Only the 2-D encoders change: the localisers' 3-D context convolutions refuse channels_last
    ("required rank 4 tensor"). Weights keep their names (`nn.Module.compile` compiles in place),
    so checkpoints load either way. Shapes are static (`dynamic=False`): a fold job sees a handful
    of batch shapes (the full batch, its epoch's short last one, the same in evaluation, a frozen
    step's), each compiled once for its size, so the full batches keep the kernels made for them;
    by default the second shape would turn the batch dimension symbolic and every later step
    would run the dynamic-shape kernels (a bare-loop rate at another batch too). Compiled frames
    are keyed by code, not by module, so Dynamo's caches are reset first: a process that trains
    fold jobs one after another starts each with none of the last one's graphs (its kernels stay
    in the on-disk cache), and one job's shapes stay inside the recompile limit. Where compilation
    fails, Dynamo falls back to eager for that frame (`suppress_errors`) and training goes on
    uncompiled; where `compile` does not exist (torch < 2.2) it is skipped with one log line.
    """
    done: list[str] = []
    torch.backends.cudnn.benchmark = cudnn_benchmark
    if cudnn_benchmark:
        done.append("cudnn_benchmark")
    encoders = backbones(model)
    if channels_last and encoders:
        for enc in encoders:
            enc.to(memory_format=torch.channels_last)
            enc.register_forward_pre_hook(_channels_last_input)
        done.append("channels_last")
    if compile_backbone and encoders:
        if not hasattr(nn.Module, "compile"):
            log.warning("torch %s has no nn.Module.compile: training uncompiled", torch.__version__)
            return done
        import torch._dynamo as dynamo

        dynamo.config.suppress_errors = True
        dynamo.reset()
        for enc in encoders:
            enc.compile(dynamic=False)
        done.append("compile")
    return done
