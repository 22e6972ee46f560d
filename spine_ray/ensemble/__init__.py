"""From out-of-fold tables to one prediction: the prior, the baseline, the competition metric,
the blend and its tuning (`spine-ray tune-ensemble`)."""
