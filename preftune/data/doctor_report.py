"""What the data doctor (:func:`preftune.data.doctor.check_data`) reports: one finding per check, the
length table, and the report as text or JSON."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

NOUNS = {"pair": "pairs", "unpaired": "KTO examples", "sft": "SFT examples", "group": "groups"}


@dataclass
class Finding:
    """One check's result. ``locations``: the first few places, ``file:line`` first."""

    check: str
    severity: str  # "ok" | "warning" | "error"
    message: str
    count: int = 0
    locations: list[str] = field(default_factory=list)


LENGTH_BIAS_BAND = (0.40, 0.60)  # share of "the preferred response is the longer one" that is not warned about


def length_bias_finding(check: str, longer: int, shorter: int, message: str) -> Finding:
    """The length-bias finding of pairs or groups: ``message`` (what was counted), a warning naming the
    remedies when the preferred response is the longer one in a share of its comparisons outside
    :data:`LENGTH_BIAS_BAND`. Needs ``longer + shorter > 0``."""
    share = longer / (longer + shorter)
    low, high = LENGTH_BIAS_BAND
    if not low <= share <= high:
        side = "longer" if share > high else "shorter"
        return Finding(check, "warning", f"{message}: a model can win by writing {side}; consider a "
                                         "length-normalised loss (simpo, ipo) or rebalancing", longer)
    return Finding(check, "ok", message, longer)


@dataclass
class LengthStats:
    """Mean, nearest-rank median and 95th percentile, and maximum of some lengths."""

    mean: float
    p50: int
    p95: int
    max: int

    @classmethod
    def of(cls, values) -> LengthStats:
        ordered = sorted(values)
        if not ordered:
            return cls(0.0, 0, 0, 0)
        rank = lambda q: ordered[max(0, math.ceil(q * len(ordered)) - 1)]  # noqa: E731
        return cls(round(sum(ordered) / len(ordered), 1), rank(0.50), rank(0.95), ordered[-1])


@dataclass
class DoctorReport:
    """Everything :func:`~preftune.data.doctor.check_data` found. ``exit_code`` is 1 when any finding is an error."""

    source: str
    file_format: str
    kind: str  # "pair" | "unpaired" | "sft" | "group"
    rows: int  # records in the file, bad ones included
    valid: int  # records preftune train would use
    record_formats: dict[str, int]
    prompt_sources: dict[str, int]  # Example.prompt_source: explicit / implicit / messages
    length_unit: str
    lengths: dict[str, LengthStats]
    findings: list[Finding]

    def finding(self, check: str) -> Finding | None:
        return next((f for f in self.findings if f.check == check), None)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def exit_code(self) -> int:
        return 1 if self.errors else 0

    def to_dict(self) -> dict:
        """JSON-able: every field, plus ``exit_code``."""
        return {**dataclasses.asdict(self), "exit_code": self.exit_code}

    def to_text(self) -> str:
        """A readable report: what the file holds, the length table, then one row per check."""
        noun = NOUNS[self.kind]
        formats = ", ".join(f"{name} {n}" for name, n in self.record_formats.items()) or "none readable"
        sources = ", ".join(f"{name} {n}" for name, n in self.prompt_sources.items()) or "-"
        lines = [f"data check: {self.source}",
                 f"  file      {self.file_format}; {self.rows} rows, {self.valid} valid {noun}",
                 f"  records   {formats}",
                 f"  prompts   {sources}",
                 f"  lengths   in {self.length_unit}",
                 f"  {'':10}{'mean':>9}{'p50':>8}{'p95':>8}{'max':>8}"]
        for name, stats in self.lengths.items():
            lines.append(f"  {name:10}{stats.mean:>9.1f}{stats.p50:>8}{stats.p95:>8}{stats.max:>8}")
        lines += ["", f"  {'status':9}{'check':27}{'count':>6}  finding"]
        for f in self.findings:
            status = f.severity if f.severity == "ok" else f.severity.upper()
            lines.append(f"  {status:9}{f.check:27}{f.count:>6}  {f.message}")
            lines += [f"  {'':42}{where}" for where in f.locations]
        errors, warnings = len(self.errors), len(self.warnings)
        lines.append(f"\n  result: {errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)} "
                     f"(exit code {self.exit_code})")
        return "\n".join(lines)
