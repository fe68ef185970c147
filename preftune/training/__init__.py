"""Training: one loop for every method, read in this order.

loop (train -> build the run -> steps -> finish), setup (build_run: precision, data, model, reference,
packing, memory plan, optimizer, resume), step (one optimizer step, the objective, held-out metrics),
hooks (callbacks for benchmarks), reference (live, adapters-off and precomputed references), divergence
(the numerical guard), signals (Ctrl-C / SIGTERM), checkpoint (the checkpoint folder format), resume
(saving and restoring training state), final_model (the final model, written atomically), run_folder
(the output folder's lock, identity and re-run rules), metrics_log (metrics.jsonl, summary.json),
progress, trackers (--report-to) and model_card.
"""
