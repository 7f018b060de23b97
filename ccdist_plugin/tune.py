"""Hyper-parameter search with Optuna (``ccdist tune``): search spaces, suggestions, trial configs,
stale-trial clean-up and the report.

A search space is written ``KEY=SPACE`` with ``KEY`` a dotted config key (``loss.alpha``) and
``SPACE`` one of ``float:LO:HI`` (uniform), ``log:LO:HI`` (log-uniform, LO > 0), ``int:LO:HI``
(integers, both ends included) or ``choice:A,B,C`` (each value read as YAML: ``0.5`` a number,
``adam`` a string). A trial's config is the base config with the suggested values set through
:meth:`~ccdist_plugin.config.TrainConfig.override_values`, so a key or value the config refuses is
refused here with the same message.

The functions here take Optuna objects (a ``Trial`` to suggest from, ``FrozenTrial`` lists to report)
but do not import Optuna themselves; the command (``ccdist_plugin/cli/tune.py``) does. Objective
(docs/tuning.md): a per-epoch validation metric, maximized; by default the CROWN-IBP-certified
accuracy.

>>> space = parse_space("loss.alpha=log:1e-3:0.5")
>>> space.kind, space.low, space.high
('log', 0.001, 0.5)
>>> parse_space("optim.optimizer=choice:adam,sgd").choices
('adam', 'sgd')
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ccdist_plugin.config import TrainConfig

__all__ = [
    "SearchSpace",
    "METRICS",
    "DEFAULT_METRIC",
    "parse_space",
    "check_space",
    "check_spaces",
    "suggest",
    "trial_config",
    "trial_dir",
    "stale_running_trials",
    "TrialRow",
    "trial_rows",
    "best_row",
    "format_table",
    "plot_trials",
]

log = logging.getLogger(__name__)

#: the objectives ``--metric`` takes (all maximized), each a per-epoch validation column
METRICS = {
    "val_crown_ibp_cert_acc": "CROWN-IBP-certified accuracy on the validation examples (the tune's)",
    "val_ibp_cert_acc": "IBP-certified accuracy on the same examples (the trainer's own metric)",
    "val_clean_acc": "standard accuracy on the validation examples",
}
#: CROWN-IBP: IBP-certified accuracy grows with α by construction (α = 1 is IBP training), so it
#: would steer every search towards α = 1; docs/tuning.md "Objective"
DEFAULT_METRIC = "val_crown_ibp_cert_acc"

_KINDS = ("float", "log", "int", "choice")
_FORM = "float:LO:HI, log:LO:HI, int:LO:HI or choice:A,B,C"


@dataclass(frozen=True)
class SearchSpace:
    """Where one config key is searched.

    Attributes:
        key: dotted config key (``loss.alpha``).
        kind: ``float``, ``log``, ``int`` or ``choice``.
        low, high: the range's ends (both included; None for ``choice``).
        choices: the values of a ``choice`` space (YAML scalars), else empty.
    """

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple[Any, ...] = ()

    def text(self) -> str:
        """The ``KEY=SPACE`` form this was parsed from (normalized)."""
        if self.kind == "choice":
            return f"{self.key}=choice:{','.join(_yaml_scalar(c) for c in self.choices)}"
        return f"{self.key}={self.kind}:{self.low!r}:{self.high!r}"

    def values_to_check(self) -> list[Any]:
        """The values that must each make a valid config: the range's ends or every choice."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _number(text: str, what: str, integer: bool) -> float | int:
    text = text.strip()
    try:
        if integer:
            return int(text)
        if "/" in text:  # fractions as in configs (2/255)
            num, den = text.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{what} must be {kind}, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {text!r}")
    return value


def parse_space(text: str) -> SearchSpace:
    """``"KEY=SPACE"`` → :class:`SearchSpace`; ``ValueError`` naming what is wrong (no ``=``, an
    unknown kind, a missing or non-numeric end, an empty or inverted range, LO <= 0 for ``log``,
    an empty or repeated choice). Whether KEY exists is :func:`check_space`'s part."""
    if "=" not in text:
        raise ValueError(
            f"{text!r} must look like KEY=SPACE with SPACE {_FORM} (e.g. loss.alpha=log:1e-3:0.5)"
        )
    key, spec = (part.strip() for part in text.split("=", 1))
    if not key:
        raise ValueError(f"{text!r} has an empty key")
    kind, colon, rest = spec.partition(":")
    kind = kind.strip()
    if kind not in _KINDS or not colon:
        raise ValueError(f"{key}: space {spec!r} is not one of {_FORM}")
    if kind == "choice":
        items = [item.strip() for item in rest.split(",")]
        if not rest.strip() or any(not item for item in items):
            raise ValueError(f"{key}: choice:{rest} has an empty choice (write choice:A,B,C)")
        choices = tuple(_choice_value(item, key) for item in items)
        if len(set(map(repr, choices))) != len(choices):
            raise ValueError(f"{key}: choice:{rest} repeats a value")
        return SearchSpace(key, kind, choices=choices)
    ends = rest.split(":")
    if len(ends) != 2 or not all(e.strip() for e in ends):
        raise ValueError(f"{key}: {spec!r} must give two ends, {kind}:LO:HI")
    integer = kind == "int"
    low = _number(ends[0], f"{key}: LO of {spec!r}", integer)
    high = _number(ends[1], f"{key}: HI of {spec!r}", integer)
    if low == high:
        raise ValueError(
            f"{key}: the range {spec!r} is empty (LO = HI); to fix the value use --set {key}={low}"
        )
    if low > high:
        raise ValueError(f"{key}: the range {spec!r} is inverted (LO > HI)")
    if kind == "log" and low <= 0:
        raise ValueError(f"{key}: a log range needs LO > 0, got {spec!r}")
    return SearchSpace(key, kind, low, high)


def _choice_value(item: str, key: str) -> Any:
    try:
        value = yaml.safe_load(item)
    except yaml.YAMLError:
        value = item
    if value is not None and not isinstance(value, (bool, int, float, str)):
        raise ValueError(f"{key}: choice {item!r} must be a single value (number, word, true/false)")
    return value


def check_space(base: TrainConfig, space: SearchSpace) -> None:
    """``ValueError`` unless every value :meth:`SearchSpace.values_to_check` names makes a valid
    config from ``base`` (an unknown key is named with the nearest valid one, by the config's own
    checks)."""
    for value in space.values_to_check():
        base.override_values({space.key: value})


def check_spaces(base: TrainConfig, spaces: Sequence[SearchSpace]) -> None:
    """:func:`check_space` for each, and ``ValueError`` when a key is searched twice."""
    seen: set[str] = set()
    for space in spaces:
        if space.key in seen:
            raise ValueError(f"{space.key} is given by two --param options")
        seen.add(space.key)
        check_space(base, space)


def suggest(trial: Any, space: SearchSpace) -> Any:
    """The value an Optuna ``Trial`` suggests for ``space`` (parameter name: the dotted key)."""
    if space.kind == "float":
        return trial.suggest_float(space.key, float(space.low), float(space.high))
    if space.kind == "log":
        return trial.suggest_float(space.key, float(space.low), float(space.high), log=True)
    if space.kind == "int":
        return trial.suggest_int(space.key, int(space.low), int(space.high))
    return trial.suggest_categorical(space.key, list(space.choices))


def trial_dir(out: str | Path, number: int) -> Path:
    """The run folder of trial ``number`` under the tune's folder."""
    return Path(out) / f"trial_{number:04d}"


def trial_config(base: TrainConfig, params: dict[str, Any], output_dir: str | Path) -> TrainConfig:
    """``base`` with the trial's values and its own run folder (validated as any config)."""
    return base.override_values({**params, "log.output_dir": str(output_dir)})


def stale_running_trials(trials: Iterable[Any], host: str) -> list[Any]:
    """RUNNING trials that a process of this host started and that is gone (killed): their
    ``host``/``pid`` user attributes name this host and a process id no longer alive. Trials of
    other hosts are left to Optuna's heartbeat."""
    out = []
    for trial in trials:
        if trial.state.name != "RUNNING" or trial.user_attrs.get("host") != host:
            continue
        pid = trial.user_attrs.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and not _alive(pid):
            out.append(trial)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


# ------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class TrialRow:
    """One trial in the report.

    Attributes:
        number: Optuna's trial number (its folder is ``trial_NNNN``).
        status: ``complete``, ``pruned``, ``diverged`` (pruned on a non-finite loss), ``failed``
            (an error, or killed) or ``running``.
        value: the metric: the final one of a complete trial, the last reported one otherwise.
        epochs: epochs that reported the metric.
        params: the trial's values by key.
        note: why it stopped early (the divergence message, the pruning epoch, ...).
    """

    number: int
    status: str
    value: float | None
    epochs: int
    params: dict[str, Any]
    note: str = ""


def trial_rows(trials: Iterable[Any]) -> list[TrialRow]:
    """Rows of the report from Optuna ``FrozenTrial`` objects, by trial number."""
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        steps = t.intermediate_values
        last = steps[max(steps)] if steps else None
        state = t.state.name.lower()
        note = ""
        if state == "complete":
            status, value = "complete", t.value
        elif state == "pruned":
            diverged = t.user_attrs.get("diverged")
            status = "diverged" if diverged else "pruned"
            note = diverged if diverged else f"pruned after epoch {max(steps) if steps else 0}"
            value = last
        elif state == "fail":
            status, value = "failed", last
            note = t.user_attrs.get("failure", "stopped by an error or an interrupt")
        else:
            status, value = state, last
        rows.append(TrialRow(t.number, status, value, len(steps), dict(t.params), note))
    return rows


def best_row(rows: Sequence[TrialRow]) -> TrialRow | None:
    """The complete trial with the highest metric (the lowest number on a tie), or None."""
    done = [r for r in rows if r.status == "complete" and r.value is not None]
    return max(done, key=lambda r: (r.value, -r.number)) if done else None


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: Sequence[TrialRow], keys: Sequence[str], metric: str) -> str:
    """A fixed-width text table of the trials (the best marked ``*``), as printed and in report.md."""
    best = best_row(rows)
    header = ["trial", "status", metric, "epochs", *keys, "note"]
    lines = [header]
    for r in rows:
        mark = "*" if best is not None and r.number == best.number else " "
        value = "" if r.value is None else f"{r.value:.4f}"
        params = [_fmt_value(r.params[k]) if k in r.params else "" for k in keys]
        lines.append([f"{r.number}{mark}", r.status, value, str(r.epochs), *params, r.note])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    out = []
    for line in lines:
        cells = [
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line[:-1], widths, strict=True))
        ]
        out.append("  ".join([*cells, line[-1]]).rstrip())
    return "\n".join(out)


def plot_trials(
    rows: Sequence[TrialRow], spaces: Sequence[SearchSpace], metric: str, path: Path
) -> Path | None:
    """``path`` (PNG): the metric against each searched key, one panel per key; complete trials as
    dots, pruned/diverged ones (their last reported value) as crosses. None without matplotlib or
    without any value to plot."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.debug("matplotlib is not installed; no %s", path)
        return None
    n = len(spaces)
    if not any(r.value is not None for r in rows):
        return None
    fig = Figure(figsize=(3.6 * n, 3.2))
    FigureCanvasAgg(fig)
    for i, space in enumerate(spaces):
        ax = fig.add_subplot(1, n, i + 1)
        for status, marker, label in (("complete", "o", "complete"), ("pruned", "x", "pruned/diverged")):
            picked = [
                r
                for r in rows
                if r.value is not None
                and space.key in r.params
                and (r.status == status or (status == "pruned" and r.status == "diverged"))
            ]
            if not picked:
                continue
            xs = [r.params[space.key] for r in picked]
            if space.kind == "choice":
                xs = [[repr(c) for c in space.choices].index(repr(x)) for x in xs]
            ax.scatter(xs, [r.value for r in picked], marker=marker, label=label)
        if space.kind == "log":
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # a narrow range labels its minor ticks
        if space.kind == "choice":
            ax.set_xticks(range(len(space.choices)))
            ax.set_xticklabels([_fmt_value(c) for c in space.choices])
        ax.set_xlabel(space.key)
        ax.set_ylabel(metric)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
