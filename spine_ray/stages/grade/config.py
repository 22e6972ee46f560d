"""Stage 2's member config (`GradeConfig`) and the switches inside it: freezing, two-step training, CutMix/mixup; the target slots."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from spine_ray.core.schema import SEVERITY_WEIGHTS
from spine_ray.engine.train_loop import TrainConfig
from spine_ray.models.grader import GraderConfig

# Slot → (condition, view id, localize view). View ids feed the grader's view embedding.
SLOTS: tuple[tuple[str, int, str], ...] = (
    ("spinal_canal_stenosis", 0, "sag_t2"),
    ("left_neural_foraminal_narrowing", 1, "sag_t1"),
    ("right_neural_foraminal_narrowing", 1, "sag_t1"),
    ("left_subarticular_stenosis", 2, "axial"),
    ("right_subarticular_stenosis", 2, "axial"),
)


AXIAL_SPINAL = ("spinal_canal_stenosis", 2, "axial")  # the sixth slot with multiview_spinal


SAGITTAL_VIEWS = (0, 1)


SAMPLE_COLUMNS = ["study_id", "level", "x", "shape", "inside", "target_mask", "labels", "gt_offset"]


@dataclass(frozen=True)
class FreezeConfig:
    """Partial freezing (level-embedding repo): the backbone frozen but its last `unfreeze_last` blocks."""

    backbone: bool = False
    unfreeze_last: int = 0  # blocks as timm's group_matcher counts them (spine_ray.models.freezing)

    def __post_init__(self) -> None:
        if self.unfreeze_last < 0:
            raise ValueError("freeze.unfreeze_last must be ≥ 0")
        if self.unfreeze_last and not self.backbone:
            raise ValueError("freeze.unfreeze_last needs freeze.backbone: true")


@dataclass(frozen=True)
class TwoStepConfig:
    """Two-step training (fifth place): after `train` (all weights, plain CE), a step on the head alone."""

    epochs: int = 5  # step 2; step 1 runs GradeConfig.train
    lr: float = 1e-4  # step 2 (same batch size and weight decay as step 1)
    warmup_frac: float = 0.0
    select: Literal["auc", "last"] = "auc"  # step 1's weights: best validation AUC where validated, else the last epoch

    def __post_init__(self) -> None:
        if self.epochs < 1 or not self.lr > 0 or not 0.0 <= self.warmup_frac < 1.0:
            raise ValueError("two_step needs epochs ≥ 1, lr > 0 and warmup_frac in [0, 1)")


@dataclass(frozen=True)
class MixConfig:
    """CutMix / mixup of training batches, slot by slot (see the module docstring); off by default."""

    cutmix_p: float = 0.0  # share of samples CutMix-ed (fifth place: 1.0)
    mixup_p: float = 0.0  # share of samples mixed up (drawn after CutMix: cutmix_p + mixup_p ≤ 1)
    alpha: float = 1.0  # λ ~ Beta(alpha, alpha)

    def __post_init__(self) -> None:
        if min(self.cutmix_p, self.mixup_p) < 0 or self.cutmix_p + self.mixup_p > 1:
            raise ValueError("mix.cutmix_p and mix.mixup_p must be ≥ 0 with a sum ≤ 1")
        if not self.alpha > 0:
            raise ValueError("mix.alpha must be > 0")

    @property
    def enabled(self) -> bool:
        """Whether batches are mixed at all (training batches then carry soft targets)."""
        return self.cutmix_p + self.mixup_p > 0


@dataclass(frozen=True)
class GradeConfig:
    """One stage-2 ensemble member: network, training, crops and augmentation."""

    name: str = "grader"
    model: GraderConfig = field(
        default_factory=lambda: GraderConfig(
            backbone="resnet10t", dim=128, lstm_hidden=64, level_embedding=True, condition_embedding=True, n_views=3
        )
    )
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=6, batch_size=8, lr=1e-3))
    sagittal_mm: tuple[float, float] = (40.0, 40.0)  # crop (height, width) in mm on sagittal images
    axial_mm: tuple[float, float] = (40.0, 40.0)
    out_px: int = 32  # crop side in pixels
    k: int = 2  # slices each side: 2k+1 per crop
    max_shift: int = 2  # largest slice jitter; the stored patch holds k + max_shift slices each side
    context: float = 1.4  # stored patch side / crop side, room for xy jitter and rotation
    slice_jitter: bool = True
    slice_sigma: float = 0.5  # slice jitter without stage-1 errors: round(N(0, sigma))
    # Whose stage-1 slice errors the jitter draws from in a training run: "fold" (the localisers of
    # this fold, whose points it validates on: the fold starts when they are done) or "run" (every
    # stage-1 fold: the fold waits for the last localiser, as stage-by-stage runs did).
    slice_errors: str = "fold"
    xy_jitter_mm: float = 2.0
    rotate_deg: float = 10.0
    intensity_aug: bool = True
    flip_prob: float = 0.5
    # Where training crops are re-cropped and augmented: "cpu" in the input pipeline (Ray Data tasks
    # or a thread), or "device": the pipeline only draws the parameters and ships the stored patches,
    # the training device applies them (`augment_torch`), the same draws for the same seed.
    augment_on: Literal["cpu", "device"] = "cpu"
    # With augment_on: device, where the intensity noise (2k+1 × out_px² normals per slot, most of
    # the pipeline's remaining work) is drawn: "pipeline" from the same generator, so every draw is
    # the CPU path's (the field ships as float16); "device" from a seed per slot drawn in its place
    # (`augment_torch.hashed_normal`): the same distribution, but the draws after it differ.
    noise_on: Literal["pipeline", "device"] = "pipeline"
    w_slice: float = 0.2  # auxiliary loss: attention finds the labelled slice
    w_any: float = 1.0  # any-severe-spinal term
    multiview_spinal: bool = False
    tta_flip: bool = True  # predict as the mean of the sample and its left–right mirror
    class_weights: tuple[float, float, float] = SEVERITY_WEIGHTS  # severity CE weights; (1, 1, 1) is plain CE
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    two_step: TwoStepConfig | None = None
    mix: MixConfig = field(default_factory=MixConfig)

    def __post_init__(self) -> None:
        if self.out_px < 8 or self.k < 0 or self.max_shift < 0:
            raise ValueError("out_px must be ≥ 8, k and max_shift ≥ 0")
        if self.context < 1.0:
            raise ValueError("context must be ≥ 1 (the stored patch holds the crop)")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError("flip_prob must be in [0, 1]")
        if self.slice_errors not in ("fold", "run"):
            raise ValueError(f"slice_errors must be fold or run, not {self.slice_errors!r}")
        if self.augment_on not in ("cpu", "device"):
            raise ValueError(f"augment_on must be 'cpu' or 'device', got {self.augment_on!r}")
        if self.noise_on not in ("pipeline", "device") or (self.noise_on == "device" and self.augment_on != "device"):
            raise ValueError("noise_on must be 'pipeline', or 'device' with augment_on: device")
        if min(*self.sagittal_mm, *self.axial_mm) <= 0:
            raise ValueError("crop sizes in mm must be positive")
        if self.model.n_views < 3:
            raise ValueError("the grader needs n_views ≥ 3 (sagittal T2, sagittal T1, axial)")
        if not (self.model.level_embedding and self.model.condition_embedding):
            raise ValueError("GradeStage feeds level and condition ids: turn both embeddings on")
        if min(self.class_weights) <= 0:
            raise ValueError("class_weights must be positive")
        if self.two_step is not None and self.freeze.backbone:
            raise ValueError("two_step trains every weight in step 1 and freezes the backbone in step 2: drop freeze")

    def steps(self) -> list[GradeConfig]:
        """The configs of the training steps: [self], or two-step's step 1 (plain CE) and step 2 (frozen backbone)."""
        if self.two_step is None:
            return [self]
        ts = self.two_step
        # Step 1 keeps `two_step` set: it says "select by AUC" (GradeStage.select).
        step1 = dataclasses.replace(self, class_weights=(1.0, 1.0, 1.0), w_any=0.0)
        step2 = dataclasses.replace(
            self, two_step=None, freeze=FreezeConfig(backbone=True),
            train=dataclasses.replace(self.train, epochs=ts.epochs, lr=ts.lr, warmup_frac=ts.warmup_frac),
        )
        return [step1, step2]

    @property
    def slots(self) -> tuple[tuple[str, int, str], ...]:
        """The sample's target slots in order."""
        return SLOTS + ((AXIAL_SPINAL,) if self.multiview_spinal else ())

    @property
    def patch_px(self) -> int:
        """Stored patch side in pixels."""
        return int(round(self.out_px * self.context))

    def crop_mm(self, view: int) -> tuple[float, float]:
        """Crop size in mm for a view id."""
        return self.axial_mm if view == 2 else self.sagittal_mm

    def patch_spacing(self, view: int) -> tuple[float, float]:
        """The stored patch's (row, col) mm per pixel for a view id."""
        mm = self.crop_mm(view)
        return mm[0] * self.context / self.patch_px, mm[1] * self.context / self.patch_px
