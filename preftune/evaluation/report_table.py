"""An evaluation's result as text: the plain table ``preftune eval`` prints, and JSON."""

from __future__ import annotations

import json

from preftune.common.files import json_safe


def format_table(result: dict) -> str:
    """The result of :func:`preftune.evaluation.evaluate.evaluate_model` as a plain-text table (one metric a
    line)."""
    pref, nll, gen = result["preference"], result["nll"], result.get("generation")
    if result.get("kind") == "reward":
        rows = [("reward model", result["model"]), held_out_row(result),
                ("pair accuracy", f"{pref['accuracy']:.4f} [{pref['accuracy_low']:.3f}, {pref['accuracy_high']:.3f}]"
                                  f" 95% CI   [{pref['accuracy_definition']}]"), *ranking_rows(pref),
                ("reward chosen / rejected", f"{pref['reward_chosen']:+.4f} / {pref['reward_rejected']:+.4f}"),
                ("reward margin", f"{pref['reward_margin']:+.4f}"),
                ("Bradley-Terry loss", f"{pref['bt_loss']:.4f}")]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
    rows = [("model", result["model"]), ("reference", result["reference"]), held_out_row(result),
            ("preference accuracy", f"{pref['accuracy']:.4f}   [{pref['accuracy_definition']}]"), *ranking_rows(pref)]
    if pref["dpo_loss"] is not None:
        rows += [("reward margin", f"{pref['reward_margin']:+.4f}   (beta = {pref['beta']})"),
                 ("reward chosen / rejected", f"{pref['reward_chosen']:+.4f} / {pref['reward_rejected']:+.4f}"),
                 ("DPO loss", f"{pref['dpo_loss']:.4f}")]
    rows.append(("logp chosen / rejected", f"{pref['logps_chosen']:.3f} / {pref['logps_rejected']:.3f}   "
                                           f"(margin {pref['logp_margin']:+.3f})"))
    if pref.get("chosen_logp_change") is not None:
        best = "best response of each group" if pref.get("groups") is not None else "chosen response"
        rows.append(("logp chosen change vs base", f"{pref['chosen_logp_change']:+.3f}   (mean logp_model - "
                                                   f"logp_base of the {best}; < 0: the model lowered it)"))
    rows.append(("NLL/token model", f"{nll['model']:.4f}   ({nll['tokens']} tokens of {nll['data']})"))
    if nll["base"] is not None:
        rows += [("NLL/token base", f"{nll['base']:.4f}"),
                 ("NLL difference", f"{nll['difference']:+.4f}   (model - base; > 0 = worse than the base)")]
    if gen:
        stderr = f" +- {gen['kl_stderr']:.3f}" if gen["kl_stderr"] is not None else ""
        rows.append(("KL(model || base)", f"{gen['kl']:.4f}{stderr} nats/sequence ({gen['kl_samples']} samples, "
                                          f"max {gen['max_new_tokens']} new tokens)"))
        wr = gen["win_rate"]
        if wr:
            rows.append(("win rate vs base", f"{wr['rate']:.3f} [{wr['low']:.3f}, {wr['high']:.3f}] 95% CI   "
                                             f"(n={wr['n']}: {wr['wins']} wins, {wr['losses']} losses, "
                                             f"{wr['ties']} ties; judge {gen['judge']})"))
            rows.append(("judge problems", f"inconsistent {wr['inconsistent']}, unparseable {wr['unparseable']}, "
                                           f"errors {wr['errors']} (each counted as a tie)"))
        if gen.get("score_model") is not None:
            rows.append(("judge score model / base", f"{gen['score_model']:.4f} / {gen['score_base']:.4f}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def held_out_row(result: dict) -> tuple[str, str]:
    """The row naming the held-out data: its pairs, or its response groups and their ordered pairs."""
    pref = result["preference"]
    if pref.get("groups") is not None:
        return "held-out groups", f"{pref['groups']}, {pref['pairs']} ordered pairs ({result['data']})"
    return "held-out pairs", f"{pref['pairs']} ({result['data']})"


def ranking_rows(pref: dict) -> list[tuple[str, str]]:
    """The ranking accuracy and Kendall's tau rows of a preference result (none in a result without them)."""
    if pref.get("ranking_accuracy") is None:
        return []
    tau = pref.get("kendall_tau")
    return [("ranking accuracy", f"{pref['ranking_accuracy']:.4f}   (implicit rewards vs labels over "
                                 f"{pref['ordered_pairs']} ordered pairs, tied labels skipped)"),
            ("Kendall tau-b", (f"{tau:+.4f}   (implicit rewards vs labels within each group, mean over "
                               f"{pref['tau_groups']} groups)") if tau is not None else "n/a (every group tied)")]


def to_json(result: dict) -> str:
    """JSON text; non-finite floats become null (JSON has no NaN)."""
    return json.dumps(json_safe(result), indent=1)
