"""The tour: every method on its embedded default, end to end, in a few minutes on a CPU.

Each method contributes one stage (a `tour.py` in its own folder, using the public API only):
it builds or loads a model, trains briefly on real data that a PyPI package ships, evaluates,
saves, reloads with `from_pretrained`, and returns what it measured. The frame runs the stages
with a progress bar each and writes `report.md` and the stages' PNG plots into one folder.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from peft_ext.serialization import atomic_write_text

# name -> "module:function"; the function takes (out_dir, progress) and returns a StageResult.
STAGES: dict[str, str] = {
    "nola": "peft_ext.tuners.nola.tour:run_stage",
    "mixda": "peft_ext.tuners.mixda.tour:run_stage",
    "longmem": "peft_ext.models.longmem.tour:run_stage",
    "mot": "peft_ext.models.mot.tour:run_stage",
    "leyolo": "peft_ext.models.leyolo.tour:run_stage",
}


@dataclass
class StageResult:
    title: str
    metrics: dict[str, float | int | str]
    figures: list[str] = field(default_factory=list)  # file names inside the stage's folder
    summary: str = ""


class StageProgress:
    """What a stage reports its progress to: a tqdm bar of `total` units."""

    def __init__(self, name: str, total: int):
        self._bar = tqdm(total=total, desc=f"tour/{name}", unit="step", leave=True)

    def update(self, n: int = 1, **postfix) -> None:
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


def _load_stage(name: str) -> Callable:
    module_name, _, function = STAGES[name].partition(":")
    return getattr(importlib.import_module(module_name), function)


def run_tour(out_dir: str | Path, only: list[str] | None = None) -> Path:
    """Run the tour's stages (all, or those in `only`) and return the path of `report.md`."""
    names = list(STAGES) if not only else only
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise ValueError(f"Unknown tour stage(s) {unknown}; the stages are {list(STAGES)}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = ["# peft-ext tour\n"]
    for name in names:
        stage_dir = out_dir / name
        stage_dir.mkdir(exist_ok=True)
        start = time.perf_counter()
        result: StageResult = _load_stage(name)(stage_dir, lambda total, name=name: StageProgress(name, total))
        seconds = time.perf_counter() - start
        lines = [f"## {result.title}\n", result.summary, "", "| metric | value |", "|---|---|"]
        lines += [f"| {_cell(key)} | {_cell(_format(value))} |" for key, value in result.metrics.items()]
        lines.append(f"| stage time (s) | {seconds:.1f} |")
        lines += [f"\n![{fig}]({name}/{fig})" for fig in result.figures]
        sections.append("\n".join(lines) + "\n")
        atomic_write_text(out_dir / "report.md", "\n".join(sections))
    return out_dir / "report.md"


def _format(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _cell(text: str) -> str:
    """A markdown table cell: a `|` (as in "max |Δlogits|") would end the cell, so it is escaped."""
    return text.replace("|", "\\|")
