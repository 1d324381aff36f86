"""The benchmark's tables, as text or Markdown, each with its legend: the evidence against uniform, the frontier of
harm at equal utility, and every run by setting and learning rate."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..doc_links import docs_page
from .config import KINDS
from .stats import MIN_SEEDS, RECOVERY_METRICS

FRONTIER_LEGEND = (
    "harm@ppl≤r×: lowest harmful rate (share of sampled answers the judge flags) a method reaches, over every learning "
    "rate and evaluation step, among points whose retain perplexity is at most r × the start model's and whose "
    "answers are mostly non-degenerate; mean ± std over seeds. Δ vs uniform: paired difference against uniform at "
    "the same seed, setting and loss, mean [95 % paired bootstrap interval over seeds]."
)


def format_frontier(rows: list[dict[str, Any]], budgets: Sequence[float], markdown: bool = False) -> str:
    """The frontier as a table: best harmful rate within each retain-perplexity budget, and Δ vs uniform with its
    interval; the legend follows the table."""
    header = ["setting", "loss", "method", "n"]
    for b in budgets:
        header += [f"harm@ppl≤{b:g}×", "Δ vs uniform"]
    body = []
    for row in rows:
        cells = [row.get("setting", "full"), row["loss"], row["method"], str(row.get("n", ""))]
        for b in budgets:
            cells.append(_fmt(row.get(f"harm@{b:g}", math.nan), row.get(f"harm@{b:g}_std")))
            cells.append(_fmt_ci(row, f"d_harm@{b:g}"))
        body.append(cells)
    return _render(header, body, markdown) + "\n\n" + _legend([FRONTIER_LEGEND], markdown)


def _render(header: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in body]
    return "\n".join(lines)


def _legend(entries: Sequence[str], markdown: bool) -> str:
    prefix = "- " if markdown else "  "
    return ("Legend:\n" if not markdown else "Legend:\n\n") + "\n".join(prefix + e for e in entries)


def _fmt(value: float, std: float | None = None, digits: int = 2, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    if std is not None and math.isfinite(std):
        text += f" ± {std:.{digits}f}"
    return text


def _fmt_ci(row: dict[str, Any], key: str, digits: int = 2, percent: bool = False) -> str:
    """`mean [low, high]` of `row[key]` and its interval `row[key_lo]`, `row[key_hi]` (`±∞` when unbounded)."""
    value = row.get(key, math.nan)
    if value is None or not math.isfinite(value):
        return "–"
    scale, unit = (100.0, " %") if percent else (1.0, "")

    def one(v, signed=True):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "?"
        if math.isinf(v):
            return "+∞" if v > 0 else "-∞"
        return f"{v * scale:+.{digits}f}" if signed else f"{v * scale:.{digits}f}"

    low, high = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    return f"{one(value)}{unit} [{one(low)}, {one(high)}]"


TABLE_COLUMNS = (
    ("setting", "setting", "full: full fine-tuning; lora: a LoRA adapter (r 8, alpha 16, every linear layer)"),
    ("lr", "lr", "learning rate (AdamW, constant)"),
    ("loss", "loss", "unlearning loss (dpo: the DPO baseline on positive data)"),
    ("method", "method", f"what is unlearned ({docs_page('results')}); start: the start model"),
    ("n", "n", "seeds"),
    ("harmful", "harmful_rate", "harmful rate: share of sampled answers the judge scores ≥ 0.5, mean ± std over seeds"),
    ("Δharmful [95% CI]", "d_harmful_rate", None),
    ("harm p", "harm_prob", "mean judge probability over more samples per prompt (continuous harm measure)"),
    ("Δharm p [95% CI]", "d_harm_prob", None),
    ("retain ppl", "retain_ppl", "perplexity of the chosen answers the start model was trained on (utility)"),
    ("Δppl [95% CI]", "d_retain_ppl", None),
    ("J", "J", "DPO loss on the held-out alignment pairs against the start model (what U2A minimises)"),
    ("ΔJ [95% CI]", "d_J", None),
    ("test DPO", "test_dpo_loss", "the same DPO loss on the test pairs"),
    ("pref acc", "pref_acc", "share of test pairs whose chosen answer has the higher per-token log-probability"),
    ("Δpref [95% CI]", "d_pref_acc", None),
    ("degen.", "degenerate_rate", "share of answers that are (almost) empty, repetitive or mostly non-words"),
    ("coll.", "collapsed", "collapsed runs / runs (more than half degenerate, or retain ppl > 3× the start's)"),
    ("prec 1st→last", "prec", "harmful share of U2A's selection at its first and last refresh (base rate: sel)"),
    ("sel harm/low/near", "sel", "share of each kind among the negatives trained at the end (ω > 0)"),
    ("mass harm/low/near", "mass", "share of each kind in the weight mass at the end"),
)
DELTA_LEGEND = (
    "Δx [95% CI]: paired difference x(method) - x(uniform) at the same seed, setting, learning rate and loss, mean "
    "over seeds [95 % paired bootstrap interval: seeds resampled 10,000 times by default, fixed generator seed]; "
    f"±∞ = fewer than {MIN_SEEDS} seeds (by default; too few for a bootstrap interval to mean 95 %)."
)


def _cell(row: dict[str, Any], key: str) -> str:
    if key == "lr":
        return "–" if row["lr"] is None else f"{row['lr']:g}"
    if key in ("setting", "loss", "method"):
        return str(row.get(key, "full"))
    if key == "n":
        return str(row.get("n", ""))
    if key == "collapsed":
        return f"{row['collapsed']}/{row['n']}"
    if key == "prec":
        vals = [row.get(f"sel_harmful_{k}", math.nan) for k in ("first", "last")]
        return "–" if not all(v is not None and math.isfinite(v) for v in vals) else "→".join(f"{v:.2f}" for v in vals)
    if key in ("sel", "mass"):
        vals = [row.get(f"{key}_{k}", math.nan) for k in KINDS]
        return "–" if not all(math.isfinite(v) for v in vals) else "/".join(f"{v:.2f}" for v in vals)
    if key.startswith("d_"):
        return _fmt_ci(row, key)
    return _fmt(row.get(key, math.nan), row.get(f"{key}_std"))


def format_table(summary: list[dict[str, Any]], markdown: bool = False) -> str:
    """The summary as a text (or Markdown) table: metrics as mean ± std over seeds, Δ = paired difference vs
    uniform at the same seed, setting, learning rate and loss with its bootstrap interval; the legend follows."""
    header = [name for name, _, _ in TABLE_COLUMNS]
    body = [[_cell(row, key) for _, key, _ in TABLE_COLUMNS] for row in summary]
    legend = [f"{name}: {text}" for name, _, text in TABLE_COLUMNS if text] + [DELTA_LEGEND]
    return _render(header, body, markdown) + "\n\n" + _legend(legend, markdown)


EVIDENCE_LEGEND = (
    "Δharmful / Δharm p / ΔJ: paired difference U2A - uniform (same seed, setting, lr, loss), mean [95 % paired "
    "bootstrap interval over seeds]; lower is better.",
    'verdict: the claim "U2A beats uniform" on that measure: holds (interval below 0), does not hold (above 0), '
    f"inconclusive (interval spans 0; always so with fewer than {MIN_SEEDS} seeds by default).",
    "rec. x: share of the oracle's gain over uniform that U2A recovers, (uniform - U2A) / (uniform - oracle) on the "
    "means over seeds, in % [95 % bootstrap interval]; 100 % = as good as the oracle, 0 % = no better than uniform; "
    "– when the oracle gains nothing, ±∞ when the oracle's gain itself is not clear of 0.",
    "prec 1st / last: harmful share of the selected negatives at the first and the last refresh (mean over seeds).",
    "refr.: refreshes per run (mean). void: a collapsed run on either side (read next to retain ppl).",
)


def format_evidence(claims: list[dict[str, Any]], markdown: bool = False) -> str:
    """The evidence table: per setting, lr, loss and U2A variant, the paired intervals against uniform, the verdicts,
    the share of the oracle's gain recovered and the selection precision; the legend follows."""
    header = [
        "setting",
        "lr",
        "loss",
        "method",
        "n",
        "Δharmful [95% CI]",
        "verdict",
        "Δharm p [95% CI]",
        "verdict",
        "ΔJ [95% CI]",
        "verdict",
        "rec. harmful",
        "rec. harm p",
        "rec. J",
        "prec 1st",
        "prec last",
        "refr.",
        "void",
    ]
    body = []
    for c in claims:
        body.append(
            [
                c["setting"],
                f"{c['lr']:g}",
                c["loss"],
                c["method"],
                str(c["n"]),
                _fmt_ci(c, "d_harmful_rate"),
                c["verdict_harm"],
                _fmt_ci(c, "d_harm_prob"),
                c["verdict_harm_prob"],
                _fmt_ci(c, "d_J"),
                c["verdict_J"],
                *(_fmt_ci(c, f"rec_{m}", digits=0, percent=True) for m in RECOVERY_METRICS),
                _fmt(c.get("sel_harmful_first", math.nan)),
                _fmt(c.get("sel_harmful_last", math.nan)),
                _fmt(c.get("n_refreshes", math.nan), digits=1),
                "yes" if c["void"] else "no",
            ]
        )
    return _render(header, body, markdown) + "\n\n" + _legend(EVIDENCE_LEGEND, markdown)


def verdict_lines(claims: list[dict[str, Any]], method: str = "u2a") -> list[str]:
    """One line per (setting, lr, loss) for `method`: the verdict on "U2A beats uniform" for each measure, with the
    interval it rests on and the recovered share of the oracle's gain."""
    lines = []
    for c in (c for c in claims if c["method"] == method):
        rec = _fmt_ci(c, "rec_harmful_rate", digits=0, percent=True)
        text = (
            f"{c['setting']} lr {c['lr']:g} {c['loss']} ({c['n']} seeds): U2A beats uniform on the harmful rate: "
            f"{c['verdict_harm']} (Δ {_fmt_ci(c, 'd_harmful_rate', digits=3)}); on the mean harm probability: "
            f"{c['verdict_harm_prob']}; on J: {c['verdict_J']}. Oracle's harmful-rate gain recovered: {rec}. "
            f"Δretain ppl {_fmt_ci(c, 'd_retain_ppl', digits=3)}."
        )
        if c["void"]:
            text += " A collapsed run: the judge rates gibberish as harmless."
        lines.append(text)
    return lines


# The console report of a run with too few seeds for an interval (the default `trl-u2a demo`): one note, then point
# estimates per setting in tables that fit CONSOLE_WIDTH columns; table.md keeps every column
CONSOLE_WIDTH = 100
POINT_COLUMNS = (
    ("loss", "loss", "unlearning loss (dpo: the DPO baseline on positive data)"),
    ("method", "method", "what is unlearned: uniform, oracle, u2a, ... (results page)"),
    ("harmful", "harmful_rate", "share of sampled answers the judge flags"),
    ("Δharm", "d_harmful_rate", None),
    ("harm p", "harm_prob", "mean judge probability"),
    ("J", "J", "DPO loss on the held-out alignment pairs (what U2A lowers)"),
    ("ΔJ", "d_J", None),
    ("ppl", "retain_ppl", "retain perplexity (utility)"),
    ("Δppl", "d_retain_ppl", None),
    ("pref", "pref_acc", "test-pair preference accuracy"),
    ("degen", "degenerate_rate", "share of degenerate answers"),
    ("prec", "prec", "harmful share of U2A's selection, first→last refresh"),
)
SETTING_NAMES = {"full": "Full fine-tuning", "lora": "LoRA adapter (r 8, alpha 16, every linear layer)"}


def one_seed_note(seeds: Sequence[int], min_seeds: int = MIN_SEEDS) -> str:
    """Why a run with fewer than `min_seeds` seeds shows point estimates and no verdict, and what gives verdicts."""
    which = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}"
    return (
        _wrap(
            f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({which}): every number below is a point estimate of "
            f"single runs. With fewer than {min_seeds} seeds there is no interval and no verdict: a difference between "
            "two methods may be seed noise."
        )
        + "\nFor paired intervals and verdicts: trl-u2a demo --full (10 seeds, about 25-30 min)."
        + f"\nWhat the methods and metrics are: {docs_page('results')}"
    )


def _wrap(text: str, indent: str = "") -> str:
    import textwrap

    return textwrap.fill(text, CONSOLE_WIDTH, initial_indent=indent, subsequent_indent=indent)


def _point(row: dict[str, Any], key: str) -> str:
    """One cell of the point-estimate table: no ± std and no interval (one seed has neither)."""
    if key in ("loss", "method"):
        return str(row.get(key))
    if key == "prec":
        return _cell(row, "prec")
    value = row.get(key)
    if value is None or not math.isfinite(value):
        return "–"
    if key.startswith("d_"):
        return f"{value:+.2f}" if key != "d_J" else f"{value:+.3f}"
    return f"{value:.3f}" if key == "J" else f"{value:.2f}"


def format_points(summary: list[dict[str, Any]]) -> str:
    """The summary as point estimates, one table per setting and learning rate, for a console; Δ = difference vs
    uniform at the same seed, setting, learning rate and loss. The start model is one line above the tables."""
    lines = []
    start = next((row for row in summary if row["method"] == "start"), None)
    if start is not None:
        lines.append(
            f"Start model: harmful {_point(start, 'harmful_rate')}, harm p {_point(start, 'harm_prob')}, "
            f"J {_point(start, 'J')}, retain ppl {_point(start, 'retain_ppl')}, pref "
            f"{_point(start, 'pref_acc')}."
        )
    groups: dict[tuple, list] = {}
    for row in summary:
        if row["method"] != "start":
            groups.setdefault((row["setting"], row["lr"]), []).append(row)
    header = [name for name, _, _ in POINT_COLUMNS]
    for (setting, lr), rows in groups.items():
        lines += ["", f"{SETTING_NAMES.get(setting, setting)}, lr {lr:g}:"]
        lines.append(_render(header, [[_point(row, key) for _, key, _ in POINT_COLUMNS] for row in rows], False))
    legend = "; ".join(f"{name}: {text}" for name, _, text in POINT_COLUMNS if text)
    legend += "; Δx: x(method) - x(uniform), same seed, setting, lr and loss. Lower harmful, J and ppl are better."
    return "\n".join([*lines, "", _wrap(legend)])


def format_frontier_points(rows: list[dict[str, Any]], budgets: Sequence[float]) -> str:
    """The frontier as point estimates: each cell the best harmful rate within a retain-perplexity budget and, in
    parentheses, its difference vs uniform."""
    header = ["setting", "loss", "method", *(f"ppl≤{b:g}×" for b in budgets)]
    body = []
    for row in rows:
        cells = [row.get("setting", "full"), row["loss"], row["method"]]
        for b in budgets:
            value, delta = row.get(f"harm@{b:g}"), row.get(f"d_harm@{b:g}")
            text = "–" if value is None or not math.isfinite(value) else f"{value:.2f}"
            if delta is not None and math.isfinite(delta):
                text += f" ({delta:+.2f})"
            cells.append(text)
        body.append(cells)
    return _render(header, body, False)
