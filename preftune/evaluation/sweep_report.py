"""Metrics files, plots and the comparison report (Markdown and one self-contained HTML file).

Plots use matplotlib's ``Figure`` + Agg canvas directly: no pyplot, no global backend switch.
The report reads a *summary* dict built by :func:`preftune.evaluation.sweep.run_compare`::

    {"title", "base", "data", "eval_data", "criterion", "criterion_text", "best", "best_text",
     "memory_note", "notes": [...], "rows": [variant record, ...], "images": {name: Path}}

where a variant record is ``{"name", "options", "status", "error", "train_seconds",
"peak_rss_mb", "train_rss_mb", "peak_gpu_mb", "evaluation"}`` (``evaluation`` is
:func:`preftune.evaluation.evaluate.evaluate_model`'s result).
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from preftune.common.text import is_finite_number

CURVES = (("loss", "training loss"), ("rewards/accuracies", "reward accuracy (train batches)"),
          ("rewards/margins", "reward margin (train batches)"))


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a run's ``metrics.jsonl`` (an empty list when the file is missing)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break  # a torn last line (the run was killed mid-write): the rows before it stand
            raise ValueError(f"{path}:{number}: not a JSON object") from None
    return rows


def _figure(width: float, height: float, columns: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, columns, squeeze=False)[0]


def training_curves_png(runs: dict[str, list[dict]], path: str | Path) -> Path | None:
    """Loss, reward accuracy and margin vs step, one line per run; None when no run has rows.

    ``runs`` maps a run name to its metrics rows; ``eval/`` rows are ignored here.
    """
    runs = {name: [r for r in rows if "loss" in r] for name, rows in runs.items()}
    runs = {name: rows for name, rows in runs.items() if rows}
    if not runs:
        return None
    fig, axes = _figure(13, 3.8, len(CURVES))
    for ax, (key, title) in zip(axes, CURVES):
        for name, rows in runs.items():
            points = [(r["step"], r[key]) for r in rows if key in r and is_finite_number(r[key])]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    path = Path(path)
    fig.savefig(path)
    return path


def frontier_png(points: list[dict], path: str | Path, y_label: str, base_y: float | None = None) -> Path | None:
    """Reward vs KL (the DPO paper's frontier view): one point per variant.

    ``points`` are ``{"name", "kl", "kl_err", "y", "y_low", "y_high"}`` (errors may be None).
    ``base_y`` draws the base itself at KL 0 (0.5 for a win rate against the base).
    """
    points = [p for p in points if is_finite_number(p.get("kl")) and is_finite_number(p.get("y"))]
    if not points:
        return None
    fig, (ax,) = _figure(6.4, 4.6)
    for i, p in enumerate(points):
        yerr = None
        if p.get("y_low") is not None and p.get("y_high") is not None:
            yerr = [[p["y"] - p["y_low"]], [p["y_high"] - p["y"]]]
        xerr = [[p["kl_err"]], [p["kl_err"]]] if is_finite_number(p.get("kl_err")) else None
        ax.errorbar([p["kl"]], [p["y"]], xerr=xerr, yerr=yerr, fmt="o", capsize=3, markersize=7, label=p["name"])
        ax.annotate(p["name"], (p["kl"], p["y"]), textcoords="offset points",
                    xytext=(6, 6 if i % 2 == 0 else -14), fontsize=9)  # alternate: close points stay legible
    if base_y is not None:
        ax.scatter([0.0], [base_y], marker="*", s=160, color="black", zorder=3, label="base")
        ax.axhline(base_y, color="grey", linestyle=":", linewidth=1)
    ax.axvline(0.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("KL(variant || base), nats per sequence (Monte-Carlo on the variant's samples)")
    ax.set_ylabel(y_label)
    ax.set_title("reward vs KL to the base")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    path = Path(path)
    fig.savefig(path)
    return path


# ----------------------------------------------------------------------------- table


TABLE_HEADER = ("variant", "options", "status", "held-out acc", "win rate vs base [95% CI]", "KL nats/seq",
                "NLL/token (diff vs base)", "train time", "peak RSS MB (+ during training)",
                "ranking acc / Kendall tau", "chosen logp change vs base")


def table_rows(summary: dict) -> list[tuple[str, ...]]:
    """One tuple of display strings per variant, in ``TABLE_HEADER`` order."""
    out = []
    for row in summary["rows"]:
        ev = row.get("evaluation") or {}
        pref, nll, gen = ev.get("preference") or {}, ev.get("nll") or {}, ev.get("generation") or {}
        wr = gen.get("win_rate")
        win = f"{wr['rate']:.3f} [{wr['low']:.3f}, {wr['high']:.3f}]" if wr else "n/a"
        kl = "n/a"
        if gen.get("kl") is not None:
            kl = f"{gen['kl']:.3f}" + (f" ± {gen['kl_stderr']:.3f}" if gen.get("kl_stderr") is not None else "")
        nll_text = "n/a"
        if nll.get("model") is not None:
            nll_text = f"{nll['model']:.3f}"
            if nll.get("difference") is not None:
                nll_text += f" ({nll['difference']:+.3f})"
        status = row["status"] if not row.get("error") else f"{row['status']}: {row['error']}"
        rss = "n/a"
        if row.get("peak_rss_mb") is not None:
            rss = f"{row['peak_rss_mb']:.0f} (+{row.get('train_rss_mb') or 0:.0f})"
        if row.get("peak_gpu_mb") is not None:
            rss += f"; GPU {row['peak_gpu_mb']:.0f}"
        options = ", ".join(f"{k}={v}" for k, v in (row.get("options") or {}).items())
        acc = f"{pref['accuracy']:.3f}" if pref.get("accuracy") is not None else "n/a"
        seconds = f"{row['train_seconds']:.1f} s" if row.get("train_seconds") is not None else "n/a"
        out.append((row["name"], options, status, acc, win, kl, nll_text, seconds, rss, *ranking_cells(pref)))
    return out


def ranking_cells(pref: dict) -> tuple[str, str]:
    """A variant's held-out ranking accuracy / Kendall tau-b and its chosen (a group's best) response's
    log-prob change vs the base, as table cells ("n/a" where the evaluation has none)."""
    ranking = "n/a"
    if pref.get("ranking_accuracy") is not None:
        tau = pref.get("kendall_tau")
        ranking = f"{pref['ranking_accuracy']:.3f} / " + (f"{tau:+.3f}" if tau is not None else "n/a")
    change = pref.get("chosen_logp_change")
    return ranking, f"{change:+.3f}" if change is not None else "n/a"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(summary: dict, image_links: dict[str, str]) -> str:
    """The report as Markdown; ``image_links`` maps image names to paths relative to the report."""
    lines = [f"# {summary['title']}", ""]
    lines += [f"- base: `{summary['base']}`", f"- training data: `{summary['data']}`",
              f"- held-out data: `{summary['eval_data']}`", f"- criterion: {summary['criterion_text']}", ""]
    lines += [f"**{summary['best_text']}**", ""]
    lines.append("| " + " | ".join(TABLE_HEADER) + " |")
    lines.append("|" + "---|" * len(TABLE_HEADER))
    for cells in table_rows(summary):
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    lines += ["", *[f"- {note}" for note in summary.get("notes", [])], ""]
    captions = summary.get("captions", {})
    for name, link in image_links.items():
        lines += [f"## {captions.get(name, name)}", "", f"![{name}]({link})", ""]
    return "\n".join(lines)


HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
tr.failed td { background: #fff0f0; }
tr.best td { background: #f0fff0; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f6f6f6; padding: 1px 3px; }
"""


def render_html(summary: dict, images: dict[str, Path]) -> str:
    """One self-contained HTML file: the same content, PNGs embedded as base64 data URIs."""
    e = html.escape
    parts = ["<!doctype html>", "<html><head><meta charset='utf-8'>", f"<title>{e(summary['title'])}</title>",
             f"<style>{HTML_STYLE}</style></head><body>", f"<h1>{e(summary['title'])}</h1>", "<ul>",
             f"<li>base: <code>{e(str(summary['base']))}</code></li>",
             f"<li>training data: <code>{e(str(summary['data']))}</code></li>",
             f"<li>held-out data: <code>{e(str(summary['eval_data']))}</code></li>",
             f"<li>criterion: {e(summary['criterion_text'])}</li>", "</ul>",
             f"<p><strong>{e(summary['best_text'])}</strong></p>", "<table>",
             "<tr>" + "".join(f"<th>{e(h)}</th>" for h in TABLE_HEADER) + "</tr>"]
    for row, cells in zip(summary["rows"], table_rows(summary)):
        css = "failed" if row.get("error") else "best" if row["name"] == summary.get("best") else ""
        parts.append(f"<tr class='{css}'>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
    parts.append("</table><ul>")
    parts += [f"<li>{e(note)}</li>" for note in summary.get("notes", [])]
    parts.append("</ul>")
    captions = summary.get("captions", {})
    for name, path in images.items():
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        parts += [f"<h2>{e(captions.get(name, name))}</h2>",
                  f"<img alt='{e(name)}' src='data:image/png;base64,{data}'>"]
    parts.append("</body></html>")
    return "\n".join(parts)
