"""Preference losses: one pure function per method, on per-sequence log-probs, by family.

* :mod:`~preftune.methods.losses.pairwise`: DPO and the losses of its reference-relative margin h
  (cDPO, f-DPO, RPO, robust DPO, hinge, IPO, EXO, DiscoPOP).
* :mod:`~preftune.methods.losses.anchored`: pair losses scoring each completion's reward on its own
  (NCA, BCO on pairs, SPPO-hard, APO-zero, APO-down).
* :mod:`~preftune.methods.losses.distributional`: AOT, margins matched by rank within the batch.
* :mod:`~preftune.methods.losses.reference_free`: ORPO, SimPO, CPO (and CPO-SimPO).
* :mod:`~preftune.methods.losses.unpaired`: KTO, APO-zero unpaired, BCO.
* :mod:`~preftune.methods.losses.sft` and :mod:`~preftune.methods.losses.reward`: the NLL of
  supervised fine-tuning and the Bradley-Terry loss of a reward model.
* :mod:`~preftune.methods.losses.modifiers`: LD-DPO's length-desensitised log-probs and WPO's
  per-pair weights; :mod:`~preftune.methods.losses.divergences`: f-DPO's scores;
  :mod:`~preftune.methods.losses.inputs`: the checks and upcasts every loss shares.

Every pair loss takes (B,) tensors of per-sequence log-probs (one value per completion)
and returns ``(losses, chosen_rewards, rejected_rewards)``, all (B,), sometimes with a 4th
element, a dict of detached per-example metrics named as TRL names them:

* ``losses`` is unreduced: the caller takes the mean (and averages across processes).
* rewards are detached; they are for logging only.

Unpaired losses (KTO, BCO, APO-zero unpaired) return ``(losses, rewards, metrics)``;
``rpo_loss`` and ``sft_loss`` return losses only.

Which log-probs each method is given — *summed* over the completion's tokens or *averaged*
(divided by the completion length) — whether it needs a reference model, its data kind, its
options and its paper are one row of the method table, :mod:`preftune.methods.table`. Everything
is computed in float32 at least (fp16/bf16 inputs are upcast; float64 stays float64), and
the results come back in that dtype.

Nothing here touches a model, a device or global state. Adding a loss: a pure function in the
module of its family (citing its paper, shapes in its docstring), one row in the table, a
hand-computed test in ``tests/methods/losses/``.
"""
