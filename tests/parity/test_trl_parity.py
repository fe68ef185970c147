"""Every TRL 1.16 loss gives TRL's number on the same batch.

TRL's own loss code runs on the log-probs preftune's objective gets: ``DPOTrainer._compute_loss``,
``KTOTrainer._compute_loss`` and ``CPOTrainer.cpo_loss`` / ``get_batch_logps`` are called unbound,
with a stub ``self`` holding the config fields they read and stub models that return fixed
per-token log-probs (``outputs.log_probs``, as TRL's fused LM head does). The policy's and the
reference's log-probs differ (two seeds), so no log-ratio is zero; float32, as TRL computes, and completions differ in
length, so summed, averaged and length-desensitised log-probs all differ. TRL is a test-only
dependency: without it these tests are skipped, saying so.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from preftune.methods import table as M
from preftune.methods.objective import compute_objective
from preftune.model.logprobs import LogpOutput

trl = pytest.importorskip("trl", reason="TRL is not installed: pip install trl==1.16.* to compare losses with TRL's")
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402

# TRL 1.16's DPOConfig.loss_type values (dpo_trainer.py's "Unknown loss type" list).
TRL_DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                      "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")

PAIRS, WIDTH = 4, 9  # 4 pairs; rows of 9 tokens: a prompt of 2-3 tokens, completions of 2-6


def _mask(prompt: int, completion: int) -> torch.Tensor:
    row = torch.zeros(WIDTH, dtype=torch.long)
    row[prompt:prompt + completion] = 1
    return row


# completion_mask of TRL's batch [chosen rows; rejected rows]: lengths chosen 3, 5, 2, 6; rejected 4, 2, 5, 6
COMPLETION_MASK = torch.stack([_mask(2, 3), _mask(3, 5), _mask(2, 2), _mask(3, 6),
                               _mask(2, 4), _mask(3, 2), _mask(2, 5), _mask(3, 6)])


def _token_logps(seed: int, mask: torch.Tensor) -> torch.Tensor:
    """(R, WIDTH - 1) per-token log-probs, 0 outside the completion (as TRL's fused head gives them)."""
    gen = torch.Generator().manual_seed(seed)
    values = -torch.rand(mask.shape[0], WIDTH - 1, generator=gen) * 2.0 - 0.05
    return values * mask[:, 1:]


class StubLM(torch.nn.Module):
    """A causal LM as TRL's loss code sees it: ``model(**kw, labels=..., fused_lm_head=True)`` returns
    per-token ``log_probs`` (R, L - 1) and the fused head's side outputs. Rows are looked up by the id in
    ``input_ids[:, 0]`` (so KTO's KL batch can get other rows)."""

    is_gradient_checkpointing = False

    def __init__(self, table: torch.Tensor, log_sum_sq: torch.Tensor | None = None):
        super().__init__()
        self.table, self.log_sum_sq = table, log_sum_sq

    def forward(self, input_ids, labels=None, **kwargs):
        rows = input_ids[:, 0]
        log_probs = self.table[rows]
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
                               log_sum_sq_probs=zeros if self.log_sum_sq is None else self.log_sum_sq[rows])


def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x,
                           unwrap_model=lambda m: m)


def _flat(table: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, L-1) per-token values -> (N,) completion tokens in row-major order and their row (= sequence) ids."""
    keep = mask[:, 1:].bool()
    return table[keep], torch.nonzero(keep)[:, 0]


POLICY = _token_logps(1, COMPLETION_MASK)
REFERENCE = _token_logps(2, COMPLETION_MASK)
LOG_SUM_SQ = _token_logps(3, COMPLETION_MASK) - 0.5  # log sum_v p^2 per token, for WPO


def trl_dpo(loss_types, loss_weights=None, beta=0.1, label_smoothing=0.0, ld_alpha=None,
            f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, use_weighting=False, discopop_tau=0.05):
    """TRL 1.16's DPO loss (and its logged metrics) on the fixed batch."""
    rows = COMPLETION_MASK.shape[0]
    input_ids = torch.arange(rows)[:, None].repeat(1, WIDTH)  # column 0 names the row for the stubs
    policy = StubLM(POLICY, LOG_SUM_SQ).train()
    stub = SimpleNamespace(
        model=policy, ref_model=StubLM(REFERENCE), accelerator=_accelerator(), aux_loss_enabled=False,
        precompute_ref_logps=False, ld_alpha=ld_alpha, beta=beta, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, loss_types=list(loss_types),
        loss_weights=list(loss_weights or [1.0] * len(loss_types)), label_smoothing=label_smoothing,
        use_weighting=use_weighting,
        args=SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "completion_mask": COMPLETION_MASK}
    loss = DPOTrainer._compute_loss(stub, policy, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in stub._metrics["train"].items()}


def preftune_pairs(loss, loss_weights=None, ld_alpha=None, use_weighting=False, **options):
    """preftune's objective on the same per-token log-probs."""
    tokens, seq = _flat(POLICY, COMPLETION_MASK)
    ref_tokens, _ = _flat(REFERENCE, COMPLETION_MASK)
    lss, _ = _flat(LOG_SUM_SQ, COMPLETION_MASK)
    counts = torch.bincount(seq, minlength=2 * PAIRS)
    sums = torch.zeros(2 * PAIRS, dtype=tokens.dtype).index_add(0, seq, tokens)
    ref = torch.zeros(2 * PAIRS, dtype=tokens.dtype).index_add(0, seq, ref_tokens)
    if ld_alpha is not None:  # what preftune.training.reference returns under LD-DPO
        from preftune.methods.losses.modifiers import length_desensitized_logps

        ref = length_desensitized_logps(ref_tokens, seq, PAIRS, ld_alpha)
        options["ld_alpha"] = ld_alpha
    if use_weighting:
        options["use_weighting"] = True
    loss_value, metrics = compute_objective(loss, LogpOutput(sums, counts, tokens), PAIRS, ref_logps=ref,
                                            loss_weights=loss_weights, token_seq=seq, token_log_sum_sq=lss, **options)
    return float(loss_value), {k: float(v) for k, v in metrics.items()}


# Each TRL loss type with options that make every term count.
CASES = {
    "sigmoid": {},
    "hinge": {"beta": 0.5},
    "ipo": {"beta": 0.5},
    "exo_pair": {"label_smoothing": 0.1},
    "nca_pair": {"beta": 0.5},
    "robust": {"label_smoothing": 0.1},
    "bco_pair": {"beta": 0.5},
    "sppo_hard": {"beta": 0.5},
    "aot": {"beta": 0.5, "label_smoothing": 0.1},
    "aot_unpaired": {"beta": 0.5, "label_smoothing": 0.1},
    "apo_zero": {"beta": 0.5},
    "apo_down": {"beta": 0.5},
    "discopop": {"beta": 0.5, "discopop_tau": 0.3},
    "sft": {},
    "sigmoid_norm": {"beta": 2.0},
}


def test_every_trl_loss_type_is_a_method():
    assert set(CASES) == set(TRL_DPO_LOSS_TYPES)
    for name in TRL_DPO_LOSS_TYPES:
        M.get(name)  # raises if missing
    assert M.get("sigmoid") is M.get("dpo")


def _options(loss_type: str, case: dict) -> dict:
    """preftune's options for a TRL case: the fields the row reads (TRL's beta default 0.1 when not given)."""
    row = M.get(loss_type)
    values = {"beta": 0.1, **case}
    return {name: value for name, value in values.items() if name in row.fields}


@pytest.mark.parametrize("loss_type", TRL_DPO_LOSS_TYPES)
def test_dpo_loss_types_match_trl(loss_type):
    case = CASES[loss_type]
    trl_loss, trl_metrics = trl_dpo([loss_type], **case)
    ours, metrics = preftune_pairs(loss_type, **_options(loss_type, case))
    assert ours == pytest.approx(trl_loss, rel=1e-5, abs=1e-6), (loss_type, ours, trl_loss)
    if M.get(loss_type).reference and M.get(loss_type).logps == "sum":
        # rewards/* and logps/* as TRL logs them (IPO / sigmoid_norm log rewards on their averaged log-probs)
        for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                    "logps/rejected"):
            assert metrics[key] == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), key


def test_trl_batch_has_nonzero_log_ratios():
    """The comparison would be weak if policy == reference: every pair's log-ratios are far from 0."""
    _, metrics = trl_dpo(["sigmoid"])
    tokens, seq = _flat(POLICY - REFERENCE, COMPLETION_MASK)
    ratios = torch.zeros(2 * PAIRS, dtype=tokens.dtype).index_add(0, seq, tokens)
    assert ratios.abs().min() > 0.05
    assert metrics["rewards/margins"] != 0


def test_mpo_combination_matches_trl():
    """MPO: loss_type [sigmoid, bco_pair, sft] with loss_weights [0.8, 0.2, 1.0]."""
    trl_loss, _ = trl_dpo(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])
    ours, metrics = preftune_pairs("sigmoid,bco_pair,sft", loss_weights="0.8,0.2,1.0", beta=0.1)
    assert ours == pytest.approx(trl_loss, rel=1e-5)
    parts = 0.8 * metrics["loss/dpo"] + 0.2 * metrics["loss/bco_pair"] + 1.0 * metrics["loss/sft"]
    assert parts == pytest.approx(ours, rel=1e-5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "sppo_hard", "aot"])
def test_ld_alpha_matches_trl(loss_type):
    """LD-DPO on policy and reference (TRL: DPOConfig.ld_alpha)."""
    case = {"beta": 0.5} if loss_type != "sigmoid" else {}
    trl_loss, _ = trl_dpo([loss_type], ld_alpha=0.3, **case)
    plain, _ = trl_dpo([loss_type], **case)
    ours, _ = preftune_pairs(loss_type, ld_alpha=0.3, **_options(loss_type, case))
    assert ours == pytest.approx(trl_loss, rel=1e-5)
    assert abs(trl_loss - plain) > 1e-4  # the batch's lengths differ, so LD changes the value


@pytest.mark.parametrize("loss_type, divergence", [
    ("sigmoid", "forward_kl"), ("sigmoid", "js_divergence"), ("sigmoid", "alpha_divergence"),
    ("hinge", "js_divergence"), ("robust", "forward_kl"), ("exo_pair", "alpha_divergence"),
    ("discopop", "js_divergence"),
])
def test_f_divergences_match_trl(loss_type, divergence):
    case = {**CASES[loss_type], "f_divergence_type": divergence, "f_alpha_divergence_coef": 0.3}
    trl_loss, _ = trl_dpo([loss_type], **case)
    ours, _ = preftune_pairs(loss_type, **_options(loss_type, case))
    assert ours == pytest.approx(trl_loss, rel=1e-5)


@pytest.mark.parametrize("loss_types", [["sigmoid"], ["apo_zero"], ["sigmoid", "bco_pair"]])
def test_wpo_weighting_matches_trl(loss_types):
    """WPO (use_weighting) given the same per-token log sum p^2 (preftune's loop cannot compute it yet: the
    config refuses --use-weighting; the objective's part is checked here)."""
    trl_loss, _ = trl_dpo(loss_types, use_weighting=True)
    ours, metrics = preftune_pairs(",".join(loss_types), use_weighting=True, beta=0.1)
    assert ours == pytest.approx(trl_loss, rel=1e-5)
    assert metrics["wpo/weights"] > 0 and abs(metrics["wpo/weights"] - 1) > 0.1


def test_wpo_weighting_of_the_sft_term():
    """TRL 1.16 crashes on use_weighting with loss_type sft (an in-place multiply of its expanded SFT loss:
    "more than one element of the written-to tensor refers to a single memory location"). What it means to
    compute — mean over pairs of L_sft * w — is L_sft * mean(w), with the sigmoid part as TRL computes it."""
    with pytest.raises(RuntimeError, match="single memory location"):
        trl_dpo(["sigmoid", "sft"], use_weighting=True)
    sigmoid_weighted, _ = trl_dpo(["sigmoid"], use_weighting=True)
    sft_plain, _ = trl_dpo(["sft"])
    ours, metrics = preftune_pairs("sigmoid,sft", use_weighting=True, beta=0.1)
    assert ours == pytest.approx(sigmoid_weighted + sft_plain * metrics["wpo/weights"], rel=1e-5)


# ---------------------------------------------------------------------------------------------- KTO


def _kto(loss_type: str, beta=0.5, desirable_weight=1.3, undesirable_weight=0.7):
    """TRL's KTOTrainer._compute_loss and preftune's objective on 6 unpaired examples: rows 0-5 are the
    examples' own completions, rows 6-11 the mismatched (KL) ones."""
    labels = torch.tensor([True, False, True, True, False, False])
    n = labels.shape[0]
    mask = torch.cat([COMPLETION_MASK[:n], COMPLETION_MASK[2:2 + n]])  # own, then KL completions
    policy_table, ref_table = _token_logps(4, mask), _token_logps(5, mask)
    ids = torch.arange(2 * n)[:, None].repeat(1, WIDTH)
    policy = StubLM(policy_table).train()
    stub = SimpleNamespace(
        model=policy, ref_model=StubLM(ref_table), accelerator=_accelerator(), aux_loss_enabled=False,
        precompute_ref_logps=False, calculate_KL=loss_type == "kto", beta=beta, loss_type=loss_type,
        desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None), _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1)
    stub._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(stub, model, batch)
    inputs = {"input_ids": ids[:n], "attention_mask": torch.ones_like(ids[:n]), "completion_mask": mask[:n],
              "KL_input_ids": ids[n:], "KL_attention_mask": torch.ones_like(ids[n:]), "KL_completion_mask": mask[n:],
              "label": labels}
    trl_loss = float(KTOTrainer._compute_loss(stub, policy, inputs, return_outputs=False))

    rows = 2 * n if loss_type == "kto" else n  # preftune's batch: K = 2 (own, partner) for KTO, else K = 1
    tokens, seq = _flat(policy_table[:rows], mask[:rows])
    ref_tokens, _ = _flat(ref_table[:rows], mask[:rows])
    counts = torch.bincount(seq, minlength=rows)
    sums = torch.zeros(rows, dtype=tokens.dtype).index_add(0, seq, tokens)
    ref = torch.zeros(rows, dtype=tokens.dtype).index_add(0, seq, ref_tokens)
    ours, metrics = compute_objective(loss_type, LogpOutput(sums, counts, tokens), n, ref_logps=ref, labels=labels,
                                      beta=beta, desirable_weight=desirable_weight,
                                      undesirable_weight=undesirable_weight)
    return trl_loss, float(ours), stub._metrics["train"], metrics


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_loss_types_match_trl(loss_type):
    trl_loss, ours, trl_metrics, metrics = _kto(loss_type)
    assert ours == pytest.approx(trl_loss, rel=1e-5)
    if loss_type == "kto":
        assert float(metrics["kl"]) == pytest.approx(trl_metrics["kl"][-1], rel=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert float(metrics[key]) == pytest.approx(trl_metrics[key][-1], rel=1e-5), key


# ---------------------------------------------------------------------------------------------- CPO


@pytest.mark.parametrize("loss, trl_loss_type", [("cpo", "sigmoid"), ("cpo_simpo", "simpo")])
def test_cpo_matches_trl(loss, trl_loss_type):
    """TRL's CPOTrainer: log-probs by its get_batch_logps from logits, cpo_loss, plus cpo_alpha times its
    NLL (CrossEntropyLoss over the chosen completion tokens)."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    gen = torch.Generator().manual_seed(6)
    rows, vocab = COMPLETION_MASK.shape[0], 11
    logits = torch.randn(rows, WIDTH, vocab, generator=gen)
    input_ids = torch.randint(0, vocab, (rows, WIDTH), generator=gen)
    labels = input_ids.masked_fill(COMPLETION_MASK == 0, -100)
    beta, gamma, alpha, eps = (0.3, 0.0, 0.7, 0.1) if loss == "cpo" else (2.0, 0.8, 0.7, 0.1)
    stub = SimpleNamespace(alpha=0.0, beta=beta, label_smoothing=eps, loss_type=trl_loss_type, simpo_gamma=gamma,
                           accelerator=_accelerator())
    average = trl_loss_type == "simpo"
    all_logps = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=average)
    trl_losses, _, _ = CPOTrainer.cpo_loss(stub, all_logps[:PAIRS], all_logps[PAIRS:])
    nll = torch.nn.CrossEntropyLoss()(logits[:PAIRS, :-1].reshape(-1, vocab), labels[:PAIRS, 1:].reshape(-1))
    trl_loss = float(trl_losses.mean() + alpha * nll)

    token_table = torch.log_softmax(logits[:, :-1], -1).gather(2, input_ids[:, 1:, None]).squeeze(2)
    tokens, seq = _flat(token_table * COMPLETION_MASK[:, 1:], COMPLETION_MASK)
    sums = torch.zeros(rows, dtype=tokens.dtype).index_add(0, seq, tokens)
    counts = torch.bincount(seq, minlength=rows)
    options = {"beta": beta, "cpo_alpha": alpha, "label_smoothing": eps}
    if loss == "cpo_simpo":
        options["simpo_gamma"] = gamma
    ours, metrics = compute_objective(loss, LogpOutput(sums, counts, tokens), PAIRS, **options)
    assert float(ours) == pytest.approx(trl_loss, rel=1e-5)
    assert float(metrics["nll_loss"]) == pytest.approx(float(nll), rel=1e-5)
