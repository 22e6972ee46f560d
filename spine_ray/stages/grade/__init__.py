"""Stage 2: grade the severity of every condition from millimetre-sized 2.5D crops at stage-1 points.

One sample per (study, level) holds T targets in fixed slots (`SLOTS`): the spinal canal from the
Sagittal T2/STIR point, left and right foramina from the Sagittal T1 points, left and right
subarticular zones from the axial points, and with `multiview_spinal` a sixth slot that sees the
spinal canal again on the axial slice (centred between the two subarticular points).

Where crops are centred: the `train` split uses the ground-truth points of labels.parquet (jittered
in collate); `val` and `test` use stage-1 points, so cross-validation sees what inference sees:
`job.inputs["points"]` (a whole points table, as `spine-ray tune-lr` gives it) or, in a training
run, `points/{view}`: the stage-1 fold-k out-of-fold tables of fold k's held-out studies, so grade
fold k starts as soon as localiser fold k is done (`spine_ray.engine.schedule`). A target without a point (series absent, or
stage 1 found nothing) is masked out (`target_mask` False, zero crop, no loss) and is *not*
predicted: it is missing from the OOF table and from `predict_study`'s mask, and the blend fills
it with the prior (`spine_ray.ensemble.prior`).

Augmentation needs crops taken *after* moving the centre, so a sample stores, per target, a
larger context patch (`context` × the crop in mm and pixels, `k + max_shift` slices each side,
float16 bytes) resampled to the crop's own mm-per-pixel; collate re-crops it with
`crops.crop_stack` (jittered slice, centre and angle), which keeps Ray Data rows self-contained.
Slice jitter draws from the stage-1 OOF `slice_err` of the slot's view in the job's points tables
(the first-place team called this crucial), else from round(N(0, slice_sigma)). In a training run
those are fold k's tables: the errors of the localisers whose points fold k is validated on,
which exist when the fold starts (not the errors of every stage-1 fold, which would make every
grade fold wait for the last localiser).
The left–right flip mirrors every crop (axial: columns; sagittal: slice order) and swaps the
left and right slots with their labels, so slot i always means condition `SLOTS[i]`.
Every random number of a batch's augmentation is drawn first (`augment.draw_params`), then
applied: in numpy on the input pipeline's CPUs (`augment_on: cpu`, the default), or, with
`augment_on: device`, batched in torch on the training device (`augment_torch`, through the
stage's `on_device` hook): the pipeline then ships the stored patches and the draws, intensity
noise included (4.5 times the bytes of the crops at the recipe's sizes, 9 times with a mix, whose
partner's crops are made again on the device). Both paths draw the same
numbers for the same seed; their crops differ by a float16 step where interpolation rounds apart.

CutMix and mixup (`MixConfig`, fifth place used CutMix with p = 1) act on an augmented batch,
after the sample cache: each sample draws one partner from the batch and, per slot, either pastes
the partner's crop inside a box of H × W (through all slices of that slot's stack; λ = the area
left its own) or blends the two crops (λ ~ Beta(α, α)). The slot's severity target becomes
λ·onehot(own) + (1−λ)·onehot(partner's) and its slice target λ·onehot(own slice) +
(1−λ)·onehot(partner's slice), an unlabelled side adding no mass (see `spine_ray.stages.losses`). A slot
is mixed only when both its own and the partner's slot are real (`target_mask`): a masked slot
never takes a partner's crop or label, and a real one never takes a partner's zero padding.

Two-step training (`TwoStepConfig`, fifth place): step 1 trains every weight with plain,
unweighted CE (and the slice term); step 2 freezes the backbone (its batch-norm statistics too)
and trains the rest with the metric-weighted CE and the any-severe term. Step 1 keeps its epoch
of best validation AUC (every path of the fold driver validates after each epoch). `FreezeConfig` alone freezes the backbone but
its last N blocks (`spine_ray.models.freezing`) for the whole training.

OOF table (`grade/<member>/oof.parquet`): row_id, study_id, fold, member, normal_mild, moderate, severe.

Modules: `config` (GradeConfig and its switches, the slots), `samples` (one sample per study and
level), `augment` (the draws; re-crop, flip, CutMix/mixup in numpy; batch tensors), `augment_torch`
(the same applied batched in torch on any device), `predict` (forward pass, flip TTA,
per-target probabilities, AUC), `stage` (`GradeStage`, what the fold driver calls).
"""
