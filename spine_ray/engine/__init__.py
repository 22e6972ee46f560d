"""Training machinery shared by every stage: the `Stage` protocol and `FoldJob`, the fold driver
(`fold.fit_fold`), the train loop, sample caches, study-level folds, tracking, and Ray at the edge:
`resources` (ResourcesConfig), `schedule` (Tune trials of lanes of folds), `worker` (the Ray Train
worker), `stream` (a worker's streamed, augmented batches).

Flow: samples (built once per key) → folds (one Ray Train run per lane) → OOF tables."""
