"""What every ``ccdist`` command shares: ε parsing, KEY=VALUE overrides, logging, checkpoint
loading, and turning expected failures into one-line errors.

Errors: a command raises :class:`CliError` (or lets a ``ValueError`` / ``OSError`` / the library's
own error types escape); :class:`CcdistGroup` prints ``error: <message>`` on one line and exits
with status 2. ``ccdist --debug COMMAND ...`` shows the traceback instead. Anything else (a bug)
keeps its traceback.
"""

from __future__ import annotations

import logging
import math
import shlex
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

__all__ = [
    "CliError",
    "CcdistGroup",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "parse_eps",
    "parse_float_list",
    "parse_overrides",
    "parse_names",
    "setup_logging",
    "data_not_found",
    "checkpoint_dataset",
    "checkpoint_eps",
    "load_checkpoint_and_model",
    "needs_teacher",
    "quote_command",
    "invoked_command",
    "alpha_crown_options",
    "alpha_crown_from_options",
]

#: exit status of an expected failure (a usage error, as click's own)
EXIT_ERROR = 2
#: exit status after Ctrl-C (128 + SIGINT), as a shell reports it
EXIT_INTERRUPTED = 130


class CliError(click.ClickException):
    """An expected failure: printed as one ``error: ...`` line, exit status 2."""

    exit_code = EXIT_ERROR

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Exception types that describe a problem with the user's input or machine, not a bug."""
    import json

    import yaml

    kinds: list[type[BaseException]] = [ValueError, OSError, json.JSONDecodeError, yaml.YAMLError]
    from ccdist_plugin.trainer import NonFiniteLossError
    from ccdist_plugin.verification import ExportError

    kinds += [ExportError, NonFiniteLossError]
    return tuple(kinds)


def _one_line(err: BaseException) -> str:
    """The message of an expected error; OS errors name the file and say what went wrong."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    text = str(err).strip() or type(err).__name__
    return text


class CcdistGroup(click.Group):
    """The ``ccdist`` group: one-line errors (exit 2) unless ``--debug``; Ctrl-C exits 130."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["ccdist.argv"] = list(args)  # for "resume with:" hints
        if "--debug" in args[1:]:  # also accepted after the command: `ccdist train ... --debug`
            ctx.meta["ccdist.debug"] = True
            args = [args[0], *(a for a in args[1:] if a != "--debug")]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
        except _expected_errors() as err:
            if ctx.meta.get("ccdist.debug"):
                raise
            raise CliError(_one_line(err) + "  (--debug shows the traceback)") from err


def invoked_command() -> list[str]:
    """``ccdist`` and the arguments of the running command (as typed, for hints)."""
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    argv = root.meta.get("ccdist.argv") if root is not None else None
    return ["ccdist", *(argv if argv is not None else sys.argv[1:])]


def quote_command(words: Iterable[str | Path]) -> str:
    """A command line a shell runs as given (paths with spaces quoted)."""
    return " ".join(shlex.quote(str(w)) for w in words)


def parse_eps(text: str, what: str = "eps", upper: float | None = 1.0) -> float:
    """``"2/255"`` or ``"0.1"`` → float; ``ValueError`` unless finite, >= 0 and (for a radius in
    pixel units) at most ``upper``."""
    text = str(text).strip()
    try:
        if "/" in text:
            num, den = text.split("/")
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{what} must be a number or a fraction like 2/255, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be finite and >= 0, got {text!r}")
    if upper is not None and value > upper:
        raise ValueError(
            f"{what} {text} = {value:.6g} is larger than {upper:g}: ε is in pixel units, where "
            "pixels lie in [0, 1] (e.g. 2/255 or 0.1)"
        )
    return value


def parse_float_list(text: str, what: str) -> list[float]:
    """Comma-separated numbers or fractions (``"0,0.5,1"``, ``"1/255,2/255"``), each >= 0."""
    return [parse_eps(v, what=what, upper=None) for v in text.split(",") if v.strip()]


def parse_names(text: str) -> tuple[str, ...]:
    """``"ibp, crown"`` → ``("ibp", "crown")`` (empty items dropped)."""
    return tuple(m.strip() for m in text.split(",") if m.strip())


def parse_overrides(
    items: Iterable[str], option: str = "--set", example: str = "key=value"
) -> dict[str, Any]:
    """``KEY=VALUE`` strings → ``{KEY: VALUE}`` with each value read as YAML (``64`` → int,
    ``[1, 2]`` → list, ``true`` → bool)."""
    from ccdist_plugin.config import parse_override

    out: dict[str, Any] = {}
    for item in items:
        try:
            key, value = parse_override(item)
        except ValueError as err:
            raise click.BadParameter(f"{err} (e.g. {example})", param_hint=option) from None
        out[key] = value
    return out


def alpha_crown_options(command: Any) -> Any:
    """``--alpha-crown`` and its settings (``ccdist eval`` and ``ccdist export`` share them); the
    command takes ``alpha_crown, alpha_crown_layers, alpha_crown_steps, alpha_crown_budget``."""
    options = [
        click.option(
            "--alpha-crown",
            is_flag=True,
            help="alpha-CROWN (ReLU slopes optimized, from full CROWN's bounds) on the points IBP/CROWN "
            "leave: alpha_crown_cert_acc in eval; what it proves skips branch and bound in export",
        ),
        click.option(
            # the choices are bounds.alpha_crown.ALPHA_LAYERS (not imported here: --help stays fast)
            "--alpha-crown-layers",
            type=click.Choice(["final", "all"]),
            default=None,
            help="final (default): the last layer's slopes over full CROWN's bounds; all: every layer's, "
            "as alpha,beta-CROWN's root bounds (tighter; 50-100x the time on a CIFAR cnn3, "
            "docs/evaluation.md)",
        ),
        click.option("--alpha-crown-steps", type=int, default=None, help="Adam steps on the slopes (20)"),
        click.option(
            "--alpha-crown-budget",
            type=int,
            default=None,
            help="with --alpha-crown-layers all: elements one optimization may hold (2**28, 2 GiB in "
            "float64); a point above it gets the last layer's slopes only, with a warning",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def alpha_crown_from_options(enabled: bool, layers: str | None, steps: int | None, budget: int | None) -> Any:
    """The :class:`~ccdist_plugin.bounds.alpha_crown.AlphaCrownSettings` of
    :func:`alpha_crown_options`' values, None without ``--alpha-crown``; a setting given without it
    is a usage error (it would silently do nothing)."""
    # each given setting, by its AlphaCrownSettings field (its option is --alpha-crown-<field>)
    given = {k: v for k, v in {"layers": layers, "steps": steps, "budget": budget}.items() if v is not None}
    if not enabled:
        if given:
            stray = ", ".join(f"--alpha-crown-{k}" for k in given)
            raise click.UsageError(f"{stray} only apply with --alpha-crown")
        return None
    from ccdist_plugin.bounds.alpha_crown import AlphaCrownSettings

    try:
        return AlphaCrownSettings(**given)
    except ValueError as err:
        raise click.UsageError(str(err)) from None


def data_not_found(err: Exception, hint: str) -> Exception:
    """A dataset-not-found error that says how to give the data folder on this command's line."""
    from ccdist_plugin.data import DatasetNotFoundError

    return DatasetNotFoundError(str(err).replace("set CCDIST_DATA or pass root=", f"pass {hint}"))


def checkpoint_eps(cfg: dict[str, Any], given: float | None) -> float:
    """``--eps`` when given, else the radius the checkpoint was trained for."""
    if given is not None:
        return given
    if cfg.get("eps") is None:
        raise ValueError("the checkpoint names no eps: pass --eps")
    return parse_eps(str(cfg["eps"]), "the checkpoint's eps")


def checkpoint_dataset(cfg: dict[str, Any], data_name: str | None, data_root: str | None):
    """``(name, root, datasets)``: the dataset a checkpoint was trained on (its config's ``data``
    section, with its options, so that the test split is the same), or ``--data`` / ``--data-root``."""
    from ccdist_plugin.data import DatasetNotFoundError, load_dataset

    data_cfg = cfg.get("data") or {}
    name = data_name or data_cfg.get("name")
    if not name:
        raise ValueError("the checkpoint names no dataset: pass --data")
    root = data_root if data_root is not None else data_cfg.get("root")
    options = dict(data_cfg.get("options") or {}) if name == data_cfg.get("name") else {}
    try:
        return name, root, load_dataset(name, root, **options)
    except DatasetNotFoundError as err:
        raise data_not_found(err, "--data-root DIR (or export CCDIST_DATA=DIR)") from err


def setup_logging(quiet: bool) -> None:
    """Messages of ``ccdist_plugin`` at INFO (WARNING when ``quiet`` or not the first process of a
    ``torchrun`` job), bare text on stderr."""
    from ccdist_plugin import distributed

    quiet = quiet or not distributed.is_main_process()
    level = logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s")
    logging.getLogger("ccdist_plugin").setLevel(level)


def needs_teacher(cfg) -> bool:
    """Whether the config's loss distils from a teacher (the loss class says so)."""
    from ccdist_plugin import losses

    method = cfg.loss.method
    return method in losses.list_losses() and losses.loss_class(method).teacher_use == "required"


def load_checkpoint_and_model(path: str | Path):
    """``(payload, model)`` of a checkpoint: the model in eval mode, its parameters checked finite."""
    from ccdist_plugin.checkpoint import load_checkpoint, model_from_payload

    payload = load_checkpoint(path)
    return payload, model_from_payload(payload, path)
