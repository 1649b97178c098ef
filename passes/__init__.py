"""The three graph passes, installed as ``fxmerge.passes``: analysis, dp and rewrite."""
