"""The graph passes, installed as ``fxmerge.passes``: capture (:mod:`.tracing`), recognition
(:mod:`.patterns`, :mod:`.activations`), the analysis (:mod:`.analysis`, :mod:`.pruning`), the
rewrite (:mod:`.rewrite`, :mod:`.weights`), and the pure DP (:mod:`.dp`, torch-free)."""
