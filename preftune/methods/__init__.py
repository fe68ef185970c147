"""Methods: pure loss functions (each citing its paper), the method table (one row per method), and the objective that turns a batch's log-probs into the configured loss."""
