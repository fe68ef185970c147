"""Methods: pure loss functions by family, each citing its paper (:mod:`~preftune.methods.losses`), the
method table, one row per method (:mod:`~preftune.methods.table`), and the objective that turns a batch's
log-probs into the configured loss (:mod:`~preftune.methods.objective`)."""
