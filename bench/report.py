"""The figures of one run: the printed table and ``bench/results.json``."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results.json"


@dataclass
class Figure:
    section: str
    name: str
    value: float
    unit: str
    reference: float | None = None  # measured in this run
    reference_name: str = ""
    target: str = ""  # e.g. ">= 0.35 x floor (issue 12)", "<= 25 ms"
    ok: bool | None = None  # None: no target
    size: str = ""  # which size ran
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.reference is None or not self.reference or math.isnan(self.value):
            return None
        return self.value / self.reference


@dataclass
class Report:
    started: float = field(default_factory=time.time)
    figures: list[Figure] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    sections_seconds: dict[str, float] = field(default_factory=dict)

    def add(self, section: str, name: str, value: float, unit: str, **kw: Any) -> Figure:
        fig = Figure(section, name, float(value), unit, **kw)
        self.figures.append(fig)
        print(
            f"  {name}: {_fmt(fig.value)} {unit}"
            + (f"  ({_fmt(fig.ratio, 2)} x {fig.reference_name})" if fig.ratio is not None else "")
            + (f"  [{'PASS' if fig.ok else 'MISS'} {fig.target}]" if fig.ok is not None else ""),
            flush=True,
        )
        return fig

    def table(self) -> str:
        head = ("figure", "value", "reference", "ratio", "target", "result")
        rows: list[tuple[str, ...]] = []
        for f in self.figures:
            ref = f"{_fmt(f.reference)} ({f.reference_name})" if f.reference is not None else ""
            result = "" if f.ok is None else ("PASS" if f.ok else "MISS")
            name = f"{f.name}" + (f" [{f.size}]" if f.size else "")
            rows.append(
                (
                    name,
                    f"{_fmt(f.value)} {f.unit}",
                    ref,
                    _fmt(f.ratio, 2) if f.ratio is not None else "",
                    f.target,
                    result,
                )
            )
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        line = "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))
        out = [line, "-" * len(line)]
        section = None
        for f, r in zip(self.figures, rows, strict=True):
            if f.section != section:
                section = f.section
                out.append(f"[{section}]")
            out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        for name, err in self.errors.items():
            out.append(f"[{name}] FAILED: {err}")
        missed = [f for f in self.figures if f.ok is False]
        passed = [f for f in self.figures if f.ok is True]
        out.append(
            f"targets: {len(passed)} PASS, {len(missed)} MISS"
            + (f" ({', '.join(f.name for f in missed)})" if missed else "")
        )
        return "\n".join(out)

    def write(self, path: Path = RESULTS, args: dict[str, Any] | None = None) -> None:
        doc = {
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "seconds": round(time.time() - self.started, 1),
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "args": args or {},
            "sections_seconds": self.sections_seconds,
            "errors": self.errors,
            "figures": [{**asdict(f), "ratio": f.ratio} for f in self.figures],
        }
        path.write_text(json.dumps(_clean(doc), indent=1, allow_nan=False) + "\n")


def _clean(value: Any) -> Any:
    """NaN and infinities become null, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _fmt(value: float | None, digits: int | None = None) -> str:
    if value is None:
        return ""
    if math.isnan(value):
        return "n/a"
    if digits is not None:
        return f"{value:.{digits}f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"
