"""The method table: every training method is one row.

A row says everything the rest of preftune needs to know about a method: its pure loss
function (in the family module of :mod:`preftune.methods.losses` it belongs to), whether it needs a
reference model, whether that loss takes *summed* or token-*averaged* log-probs, the data kinds it
trains on (of :data:`preftune.data.formats.KINDS`), which tensors and options it is given, its
per-method defaults and its paper. Config validation and ``--help`` (:mod:`preftune.config.train_config`),
the objective (:mod:`preftune.methods.objective`) and the training loop read the rows; nothing else
names a method. Adding a method = one loss function, one row, one test.

Names are TRL's (``DPOConfig.loss_type``, ``CPOConfig``, ``KTOConfig``) where TRL has the
method, ``sigmoid`` being another name of ``dpo``. Several methods can be trained at once as a
weighted sum (MPO, Wang et al. 2024, "Enhancing the Reasoning Ability of Multimodal Large
Language Models via Mixed Preference Optimization": ``--loss sigmoid,bco_pair,sft
--loss-weights 0.8,0.2,1.0``): :func:`parse` returns such a :class:`Combination`.

Tensors a loss may ask for (``inputs``), built by :mod:`preftune.methods.objective`, all (G,) for G
pairs or examples unless said otherwise:

* pairs: ``policy_chosen_logps``, ``policy_rejected_logps``, ``ref_chosen_logps``,
  ``ref_rejected_logps`` (summed or averaged as the row says; length-desensitised under
  ``--ld-alpha``); ``chosen_nll`` (token-averaged NLL of each chosen completion);
  ``chosen_token_nll`` (0-d: the NLL per token over all chosen tokens of the batch);
  ``chosen_counts`` (tokens per chosen completion). SFT data is read as its "chosen" side.
* unpaired: ``policy_logps``, ``ref_logps`` (summed, each example's own completion),
  ``labels`` (bool, True = desirable), ``kl`` (0-d, KTO's reference point from mismatched
  completions), ``reward_shift`` (0-d, BCO's running mean reward).
* groups (G groups of up to K responses, all [G, K]): ``policy_logps``, ``reference_logps`` (summed or
  averaged as the row says), ``scores`` (higher = better), ``mask`` (bool, False = padding); see
  :mod:`preftune.methods.losses.groups`. A pair row with kind ``group`` trains on groups through their
  ordered pairs (``--group-pairs``): its pair inputs above are built from the expanded pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from preftune.data.formats import KINDS
from preftune.methods.losses import anchored, distributional, groups, pairwise, reference_free, reward, sft, unpaired

PAIR = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
GROUP = ("policy_logps", "reference_logps", "scores", "mask")
# A pair row trains on pairs and on groups, through the group's ordered pairs (--group-pairs).
PAIRS = ("pair", "group")
F_DIVERGENCE = {"f_divergence_type": "f_divergence_type", "f_alpha_divergence_coef": "f_alpha_divergence_coef"}
# Loop-level options the objective applies to a row's per-pair losses (not keywords of its loss).
LOOP_OPTIONS = ("use_weighting", "ld_alpha")
BOTH = frozenset(LOOP_OPTIONS)
# Read by the objective for every pair row on group data: which ordered pairs of a group it trains on.
GROUP_PAIRS_FIELD = "group_pairs"


@dataclass(frozen=True, eq=False)
class Method:
    """One row of the table."""

    name: str  # the --loss name (TRL's where TRL has the method)
    loss: Callable  # the pure loss function
    citation: str  # paper (authors year, "title"), equation where it helps
    reference: bool  # needs reference log-probs
    logps: str  # "sum" or "mean": summed or token-averaged log-probs go to `loss`
    kinds: tuple[str, ...]  # data kinds it trains on; the first is its kind when trained alone
    inputs: tuple[str, ...]  # tensors passed to `loss`, by name (module docstring)
    options: Mapping[str, str] = field(default_factory=dict)  # keyword of `loss` -> TrainConfig field
    modifiers: frozenset[str] = frozenset()  # LOOP_OPTIONS it takes (WPO weighting, LD-DPO)
    defaults: Mapping[str, Any] = field(default_factory=dict)  # its own defaults of TrainConfig fields
    aliases: tuple[str, ...] = ()  # other --loss names of the same row
    kl_partners: bool = False  # needs a mismatched completion per example (KTO's KL point)
    check: Callable[[Mapping[str, Any]], str | None] | None = None  # options -> error message or None
    notes: str = ""  # for the methods table in docs/methods.md
    model_head: str = "lm"  # "lm": a causal LM's log-probs; "reward": a one-logit sequence-classification head

    def __post_init__(self) -> None:
        if self.logps not in ("sum", "mean"):
            raise ValueError(f"method {self.name}: logps must be 'sum' or 'mean', got {self.logps!r}")
        if not self.kinds or not set(self.kinds) <= set(KINDS):
            raise ValueError(f"method {self.name}: kinds must be one or more of {', '.join(KINDS)}, got {self.kinds}")

    @property
    def pairwise_on_groups(self) -> bool:
        """A pair loss that trains on groups through their ordered pairs (and so reads --group-pairs)."""
        return "pair" in self.kinds and "group" in self.kinds

    @property
    def fields(self) -> frozenset[str]:
        """Every TrainConfig field this method reads."""
        group_pairs = {GROUP_PAIRS_FIELD} if self.pairwise_on_groups else set()
        return frozenset(self.options.values()) | self.modifiers | group_pairs

    @property
    def short_citation(self) -> str:
        """``Rafailov et al. 2023`` (the part before the title)."""
        return self.citation.split(",")[0].strip()


def _exo_check(options: Mapping[str, Any]) -> str | None:
    if not options.get("label_smoothing"):
        return "--loss exo_pair needs --label-smoothing > 0 (EXO's eps; the paper uses 1e-3)"
    return None


METHODS: tuple[Method, ...] = (
    Method("dpo", pairwise.dpo_loss,
           citation='Rafailov et al. 2023, "Direct Preference Optimization", eq. 7',
           reference=True, logps="sum", kinds=PAIRS, inputs=PAIR + ("chosen_nll",),
           options={"beta": "beta", "label_smoothing": "label_smoothing", "sft_weight": "sft_weight", **F_DIVERGENCE},
           modifiers=BOTH, aliases=("sigmoid",),
           notes="`--label-smoothing` > 0 = conservative DPO (cDPO); `--sft-weight` = RPO (Pang et al. 2024), an NLL "
                 "term on the chosen response; `--f-divergence-type` = f-DPO (Wang et al. 2023)"),
    Method("ipo", pairwise.ipo_loss,
           citation='Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human '
                    'Preferences", eq. 17',
           reference=True, logps="mean", kinds=PAIRS, inputs=PAIR, options={"beta": "beta"}, modifiers=BOTH,
           notes="token-averaged log-probs, as the IPO authors and TRL"),
    Method("robust", pairwise.robust_dpo_loss,
           citation='Chowdhury et al. 2024, "Provably Robust DPO"',
           reference=True, logps="sum", kinds=PAIRS, inputs=PAIR,
           options={"beta": "beta", "label_smoothing": "label_smoothing", **F_DIVERGENCE}, modifiers=BOTH,
           notes="unbiased under label noise `--label-smoothing`"),
    Method("hinge", pairwise.hinge_loss,
           citation='Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback"',
           reference=True, logps="sum", kinds=PAIRS, inputs=PAIR, options={"beta": "beta", **F_DIVERGENCE},
           modifiers=BOTH,
           notes="margin 1/beta on the reference-relative log-ratios, as TRL"),
    Method("orpo", reference_free.orpo_loss,
           citation='Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", eq. 6-7',
           reference=False, logps="mean", kinds=PAIRS,
           inputs=("policy_chosen_logps", "policy_rejected_logps", "chosen_nll"), options={"lambda_": "orpo_lambda"},
           notes="NLL + odds-ratio term (`--orpo-lambda`); the NLL covers the chosen completion's tokens only, "
                 "token-averaged, as the paper's code does (TRL's also counts prompt tokens): the prompt is not what "
                 "we want the model to learn to write"),
    Method("simpo", reference_free.simpo_loss,
           citation='Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", eq. 6',
           reference=False, logps="mean", kinds=PAIRS,
           inputs=("policy_chosen_logps", "policy_rejected_logps", "chosen_nll"),
           options={"beta": "beta", "gamma": "simpo_gamma", "sft_weight": "sft_weight"}, defaults={"beta": 2.0},
           notes="length-normalised, margin `--simpo-gamma` (the margin itself, not gamma/beta); beta 2.0 by default"),
    Method("kto", unpaired.kto_loss,
           citation='Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 8',
           reference=True, logps="sum", kinds=("unpaired",), inputs=("policy_logps", "ref_logps", "labels", "kl"),
           options={"beta": "beta", "desirable_weight": "desirable_weight", "undesirable_weight": "undesirable_weight"},
           kl_partners=True,
           notes="unpaired thumbs-up/down data; KL point from mismatched completions"),
    Method("sft", sft.sft_loss,
           citation="supervised fine-tuning (negative log-likelihood)",
           reference=False, logps="sum", kinds=("sft", "pair"), inputs=("policy_chosen_logps", "chosen_counts"),
           modifiers=frozenset({"use_weighting"}),
           notes="NLL per token of the completions; in a combination, of the chosen ones (TRL's `sft` loss_type)"),
    Method("exo_pair", pairwise.exo_pair_loss,
           citation='Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", eq. 16',
           reference=True, logps="sum", kinds=PAIRS, inputs=PAIR,
           options={"beta": "beta", "label_smoothing": "label_smoothing", **F_DIVERGENCE}, modifiers=BOTH,
           check=_exo_check,
           notes="needs `--label-smoothing` > 0 (the paper's 1e-3)"),
    Method("nca_pair", anchored.nca_pair_loss,
           citation='Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards"',
           reference=True, logps="sum", kinds=PAIRS, inputs=PAIR, options={"beta": "beta"}, modifiers=BOTH,
           notes="scores each reward on its own, so the chosen likelihood does not fall"),
    Method("bco_pair", anchored.bco_pair_loss,
           citation='Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment"',
           reference=True, logps="sum", kinds=PAIRS, inputs=PAIR, options={"beta": "beta"}, modifiers=BOTH,
           notes="TRL's form, without the paper's reward shift (that is `bco`)"),
    Method("sppo_hard", anchored.sppo_hard_loss,
           citation='Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment", eq. 4.7',
           reference=True, logps="sum", kinds=PAIRS, inputs=PAIR, options={"beta": "beta"}, modifiers=BOTH,
           notes="win probability 1 for chosen, 0 for rejected (no preference model)"),
    Method("aot", distributional.aot_loss,
           citation='Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport"',
           reference=True, logps="sum", kinds=PAIRS, inputs=PAIR,
           options={"beta": "beta", "label_smoothing": "label_smoothing"}, modifiers=frozenset({"ld_alpha"}),
           notes="margins matched by rank within each batch; no `--use-weighting`"),
    Method("aot_unpaired", distributional.aot_unpaired_loss,
           citation='Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport"',
           reference=True, logps="sum", kinds=PAIRS, inputs=PAIR,
           options={"beta": "beta", "label_smoothing": "label_smoothing"}, modifiers=frozenset({"ld_alpha"}),
           notes="chosen and rejected log-ratios matched by rank; no `--use-weighting`"),
    Method("apo_zero", anchored.apo_zero_loss,
           citation="D'Oosterlinck et al. 2024, \"Anchored Preference Optimization and Contrastive Revisions\", eq. 7",
           reference=True, logps="sum", kinds=PAIRS, inputs=PAIR, options={"beta": "beta"}, modifiers=BOTH,
           notes="chosen better than the model's outputs: chosen up, rejected down"),
    Method("apo_down", anchored.apo_down_loss,
           citation="D'Oosterlinck et al. 2024, \"Anchored Preference Optimization and Contrastive Revisions\", eq. 8",
           reference=True, logps="sum", kinds=PAIRS, inputs=PAIR, options={"beta": "beta"}, modifiers=BOTH,
           notes="chosen worse than the model's outputs: both down, rejected more"),
    Method("discopop", pairwise.discopop_loss,
           citation='Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large Language '
                    'Models", eq. 5',
           reference=True, logps="sum", kinds=PAIRS, inputs=PAIR,
           options={"beta": "beta", "tau": "discopop_tau", **F_DIVERGENCE}, modifiers=BOTH,
           notes="log-ratio modulated logistic/exponential mix, `--discopop-tau`"),
    Method("sigmoid_norm", pairwise.dpo_loss,
           citation='Lambert et al. 2024, "Tulu 3: Pushing Frontiers in Open Language Model Post-Training", '
                    "length-normalised DPO",
           reference=True, logps="mean", kinds=PAIRS, inputs=PAIR, options={"beta": "beta"}, modifiers=BOTH,
           defaults={"beta": 5.0},
           notes="DPO on token-averaged log-probs; beta 5 by default (Tulu 3)"),
    Method("dpop", pairwise.dpop_loss,
           citation='Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive"',
           reference=True, logps="sum", kinds=PAIRS, inputs=PAIR,
           options={"beta": "beta", "dpop_lambda": "dpop_lambda"}, modifiers=BOTH,
           notes="DPO-Positive: DPO plus `--dpop-lambda` (50 by default, the paper's) x max(0, ref - policy log-prob "
                 "of the chosen) inside the sigmoid, so the chosen likelihood cannot fall for free"),
    Method("cpo", reference_free.cpo_loss,
           citation='Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance '
                    'in Machine Translation", eq. 3',
           reference=False, logps="sum", kinds=PAIRS,
           inputs=("policy_chosen_logps", "policy_rejected_logps", "chosen_token_nll"),
           options={"beta": "beta", "cpo_alpha": "cpo_alpha", "label_smoothing": "label_smoothing"},
           notes="reference-free DPO + `--cpo-alpha` x NLL (per token over the batch, as TRL)"),
    Method("cpo_simpo", reference_free.cpo_loss,
           citation='Xu et al. 2024 with Meng et al. 2024 (CPO-SimPO), "Contrastive Preference Optimization" '
                    '+ "SimPO"',
           reference=False, logps="mean", kinds=PAIRS,
           inputs=("policy_chosen_logps", "policy_rejected_logps", "chosen_token_nll"),
           options={"beta": "beta", "cpo_alpha": "cpo_alpha", "gamma": "simpo_gamma",
                    "label_smoothing": "label_smoothing"},
           defaults={"beta": 2.0},
           notes="TRL's CPOConfig(loss_type='simpo'): SimPO + `--cpo-alpha` x NLL"),
    Method("apo_zero_unpaired", unpaired.apo_zero_unpaired_loss,
           citation="D'Oosterlinck et al. 2024, \"Anchored Preference Optimization and Contrastive Revisions\", "
                    "eq. 7, unpaired",
           reference=True, logps="sum", kinds=("unpaired",), inputs=("policy_logps", "ref_logps", "labels"),
           options={"beta": "beta", "desirable_weight": "desirable_weight", "undesirable_weight": "undesirable_weight"},
           notes="TRL's KTOConfig(loss_type='apo_zero_unpaired'): KTO without the KL point"),
    Method("bco", unpaired.bco_loss,
           citation='Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment", eq. 7',
           reference=True, logps="sum", kinds=("unpaired",),
           inputs=("policy_logps", "ref_logps", "labels", "reward_shift"), options={"beta": "beta"},
           notes="unpaired; reward shift = running mean reward (restarts on --resume-from)"),
    Method("plackett_luce", groups.plackett_luce_loss,
           citation='Rafailov et al. 2023, "Direct Preference Optimization", appendix A.3 (Plackett-Luce)',
           reference=True, logps="sum", kinds=("group",), inputs=GROUP, options={"beta": "beta"},
           notes="listwise DPO on each group's ranking by score; a response competes only against those scored "
                 "strictly below it, so ties carry no order (with distinct scores: the Plackett-Luce likelihood)"),
    Method("lipo_lambda", groups.lipo_lambda_loss,
           citation='Liu et al. 2024, "LiPO: Listwise Preference Optimization through Learning-to-Rank", LiPO-lambda',
           reference=True, logps="sum", kinds=("group",), inputs=GROUP, options={"beta": "beta"},
           notes="each ordered pair's logistic loss weighted by its |delta DCG| (gains 2^score - 1, discounts "
                 "1/log2(1 + rank by the model's rewards)); scores on a small scale (0-10, ranks)"),
    Method("reward", reward.reward_loss,
           citation='Ouyang et al. 2022, "Training language models to follow instructions with human feedback", '
                    "eq. 1 (Bradley-Terry reward model)",
           reference=False, logps="sum", kinds=("pair",), inputs=("chosen_rewards", "rejected_rewards", "margins"),
           options={"center_rewards_coefficient": "center_rewards_coefficient"}, model_head="reward",
           notes="trains a reward model: a one-logit sequence-classification head on the causal LM (initialised from "
                 "it); a pair's `margin` field and `--center-rewards-coefficient` as TRL's RewardTrainer; the saved "
                 "folder is a judge: `--judge reward-model:PATH`"),
)

_BY_NAME: dict[str, Method] = {name: m for m in METHODS for name in (m.name, *m.aliases)}
# Every accepted --loss name: the rows in table order, then the aliases.
NAMES: tuple[str, ...] = tuple(m.name for m in METHODS) + tuple(a for m in METHODS for a in m.aliases)
# Every TrainConfig field some method reads (options of the loss functions and LOOP_OPTIONS).
OPTION_FIELDS: tuple[str, ...] = tuple(dict.fromkeys(f for m in METHODS for f in sorted(m.fields)))


def get(name: str) -> Method:
    """The row of ``name`` (a --loss name or alias); ValueError listing the names otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"--loss: {name!r} is not one of {', '.join(NAMES)}") from None


@dataclass(frozen=True, eq=False)
class Combination:
    """The methods of one run and their weights (one method: weight 1). Read like a row."""

    methods: tuple[Method, ...]
    weights: tuple[float, ...]

    @property
    def name(self) -> str:
        return ",".join(m.name for m in self.methods)

    @property
    def reference(self) -> bool:
        return any(m.reference for m in self.methods)

    @property
    def kl_partners(self) -> bool:
        return any(m.kl_partners for m in self.methods)

    @property
    def model_head(self) -> str:
        """``"reward"`` when the run trains a reward model (one method alone), else ``"lm"``."""
        return self.methods[0].model_head

    @property
    def kinds(self) -> tuple[str, ...]:
        """Every data kind all methods can train on, in the first method's order (pair rows: pair, group)."""
        common = tuple(k for k in self.methods[0].kinds if all(k in m.kinds for m in self.methods))
        if not common:
            kinds = "; ".join(f"{m.name}: {', '.join(m.kinds)}" for m in self.methods)
            raise ValueError(f"--loss {self.name}: these methods train on different data kinds ({kinds})")
        return common

    @property
    def kind(self) -> str:
        """The data kind the methods train on when the data does not say (the first of :attr:`kinds`)."""
        return self.kinds[0]

    @property
    def fields(self) -> frozenset[str]:
        return frozenset().union(*(m.fields for m in self.methods))

    def default(self, field_name: str, fallback: Any = None) -> Any:
        """The first method's own default of a TrainConfig field, else ``fallback``."""
        return next((m.defaults[field_name] for m in self.methods if field_name in m.defaults), fallback)


def parse(loss: str | list | tuple, loss_weights: str | list | tuple | float | None = None) -> Combination:
    """``"sigmoid,bco_pair,sft"`` and ``"0.8,0.2,1.0"`` (or lists, as YAML gives them) -> a
    :class:`Combination`; ValueError naming --loss / --loss-weights for anything else."""
    names = _split(loss)
    if not names:
        raise ValueError("--loss: no method given")
    rows = tuple(get(name) for name in names)
    seen = [m.name for m in rows]
    repeated = sorted({n for n in seen if seen.count(n) > 1})
    if repeated:
        raise ValueError(f"--loss {','.join(names)}: {', '.join(repeated)} given twice (sigmoid is dpo)")
    if loss_weights is None or (isinstance(loss_weights, str) and loss_weights.strip().lower() in ("", "none")):
        weights = (1.0,) * len(rows)
    else:
        parts = _split(loss_weights)
        try:
            weights = tuple(float(w) for w in parts)
        except ValueError:
            raise ValueError(f"--loss-weights: {loss_weights!r} is not a comma-separated list of numbers") from None
        if len(weights) != len(rows):
            raise ValueError(f"--loss-weights: {len(weights)} weight(s) for {len(rows)} method(s) in --loss "
                             f"{','.join(names)}; give one per method")
        bad = [w for w in weights if not (w >= 0 and w != float("inf"))]
        if bad or not any(weights):
            raise ValueError(f"--loss-weights: {loss_weights!r}: weights must be finite, >= 0 and not all 0")
    heads = {m.model_head for m in rows}
    if len(rows) > 1 and "reward" in heads:
        raise ValueError(f"--loss {','.join(names)}: reward trains a reward model (a classification head, no "
                         "log-probs); it cannot be combined with other methods")
    combination = Combination(rows, weights)
    combination.kind  # noqa: B018 (raises for methods of different data kinds)
    return combination


def _split(value) -> list[str]:
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        items = str(value).strip().strip("[]").split(",")
    return [item.strip().strip("'\"").strip() for item in items if item.strip().strip("'\"").strip()]


def check_options(combination: Combination, options: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """Every method option that was changed from its default must act (PITFALLS: an accepted flag that is
    silently ignored). ValueError naming the flag and the methods that read it.

    ``options``: the values of :data:`OPTION_FIELDS` (and ``beta``); ``defaults``: each field's default.
    """
    name = combination.name
    for field_name in OPTION_FIELDS:
        value = options.get(field_name, defaults.get(field_name))
        if value == defaults.get(field_name) or (field_name == "beta" and value is None):
            continue
        readers = [m for m in combination.methods if field_name in m.fields]
        if not readers:
            takers = [m.name for m in METHODS if field_name in m.fields]
            raise ValueError(f"--{_flag(field_name)} applies to --loss {_or(takers)} only, not {name}")
        if field_name in ("f_divergence_type", "use_weighting", "ld_alpha"):
            # f-DPO's reparameterisation, WPO's per-pair weights and LD-DPO's lengths only hold for the
            # reference-based losses that take them (TRL refuses the same combinations)
            missing = [m.name for m in combination.methods if m.reference and field_name not in m.fields]
            if missing:
                raise ValueError(f"--{_flag(field_name)} does not apply to --loss {_or(missing)} (methods that take "
                                 f"it: {_or([m.name for m in METHODS if field_name in m.fields])})")
    coef = options.get("f_alpha_divergence_coef", defaults.get("f_alpha_divergence_coef"))
    if coef != defaults.get("f_alpha_divergence_coef") and options.get("f_divergence_type") != "alpha_divergence":
        raise ValueError("--f-alpha-divergence-coef applies to --f-divergence-type alpha_divergence only")
    if options.get("use_weighting") and combination.kind != "pair":
        raise ValueError(f"--use-weighting (WPO) weights preference pairs; --loss {name} trains on {combination.kind} "
                         f"data")
    for method in combination.methods:
        message = method.check(options) if method.check else None
        if message:
            raise ValueError(message)


def help_text() -> str:
    """The --loss help: every name with its paper."""
    rows = []
    for m in METHODS:
        alias = f" (= {', '.join(m.aliases)})" if m.aliases else ""
        rows.append(f"{m.name}{alias}: {m.short_citation}")
    return ("Method, by TRL's loss_type names; several joined by commas are summed with --loss-weights (MPO, Wang "
            "et al. 2024). " + "; ".join(rows) + ".")


def markdown_table() -> str:
    """The methods table of docs/methods.md (kept in sync by tests/methods/test_table.py)."""
    lines = ["| `--loss` | paper | reference model | log-probs | data | notes |", "|---|---|---|---|---|---|"]
    for m in METHODS:
        names = " / ".join(f"`{n}`" for n in (m.name, *m.aliases))
        logps = "token-averaged" if m.logps == "mean" else "summed"
        lines.append(f"| {names} | {m.citation} | {'yes' if m.reference else 'none'} | {logps} | "
                     f"{' or '.join(m.kinds)} | {m.notes} |")
    return "\n".join(lines)


def _flag(field_name: str) -> str:
    return field_name.replace("_", "-")


def _or(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
