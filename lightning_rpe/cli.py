"""The ``lightning-rpe`` command (also ``python -m lightning_rpe``).

Subcommands:

* ``demo``: the embedded edge-of-stability demo (no arguments, no network needed).
* ``fit`` / ``validate`` / ``test`` / ``predict``: LightningCLI with the package's models, data
  modules and callbacks. Besides the usual ``trainer.callbacks`` list, two optional top-level
  sections ``monitor:`` (a :class:`~lightning_rpe.SharpnessMonitor`) and ``controller:`` (an
  :class:`~lightning_rpe.InstabilityController`) can be set and overridden from the command line,
  e.g. ``--controller.enabled false``.
* ``report``: figures and a summary from TensorBoard event files.

Usage errors (unknown option, missing file, invalid value) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from jsonargparse import lazy_instance
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI

from lightning_rpe import __version__
from lightning_rpe.callbacks import InstabilityController, SharpnessMonitor
from lightning_rpe.data import DigitsDataModule
from lightning_rpe.demo import _is_terminal, format_summary, run_demo
from lightning_rpe.models import MLPClassifier
from lightning_rpe.names import DEFAULT_PREFIX
from lightning_rpe.report import (
    DEFAULT_WARMUP,
    ReportError,
    load_run,
    summarize,
    write_report,
)

__all__ = ["RPELightningCLI", "main"]

PROG = "lightning-rpe"
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

_TOP_HELP = f"""usage: {PROG} COMMAND [options]

Measure and steer training instabilities (sharpness, stability threshold, eigenvector rotation).

commands:
  demo       train a small network on bundled data with gradient descent and watch the sharpness
             climb to the stability threshold 2/lr and stay there (edge of stability); no download
  fit        train from a YAML config (LightningCLI), e.g.
             {PROG} fit --config examples/configs/monitor.yaml
  validate   evaluate on the validation set (same options as fit)
  test       evaluate on the test set (same options as fit)
  predict    run predictions (same options as fit)
  report     draw figures and a summary table from the TensorBoard logs of one or more runs

Run '{PROG} COMMAND --help' for the options of a command.
"""


class _UsageError(Exception):
    """A usage error: the message is printed on one line and the exit code is 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer widths like 200,200, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive layer widths, got {text!r}")
    return widths


# -- demo ----------------------------------------------------------------------------------------
def _demo_parser() -> _Parser:
    p = _Parser(
        prog=f"{PROG} demo",
        description=(
            "Train a 64-200-200-10 tanh network on scikit-learn's bundled handwritten digits (1000 training "
            "images, no download) with full-batch gradient descent and measure the Hessian as it trains. "
            "You should see progressive sharpening (the sharpness, the largest Hessian eigenvalue, rises) "
            "until it reaches the stability threshold 2/lr, and then the edge of stability (it stays "
            "there while the loss keeps falling). Writes TensorBoard logs and a report with figures to a "
            "run folder and prints a summary. Takes about a minute on a laptop CPU."
        ),
    )
    p.add_argument("--steps", type=_positive_int, default=2500,
                   help="number of gradient-descent steps, each on all training images (default: %(default)s)")
    p.add_argument("--lr", type=_positive_float, default=0.05,
                   help="learning rate; the sharpness should settle at 2/lr (default: %(default)s, threshold 40)")
    p.add_argument("--every", type=_positive_int, default=25,
                   help="measure the Hessian every this many steps; smaller = finer curves but slower (default: %(default)s)")
    p.add_argument("--top-k", type=_positive_int, default=3, dest="top_k",
                   help="how many of the largest Hessian eigenvalues to track (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the data split and the initial weights (default: %(default)s)")
    p.add_argument("--n-train", type=_positive_int, default=1000, dest="n_train",
                   help="number of training images; the other 1797 - N are the test set (default: %(default)s)")
    p.add_argument("--hidden", type=_widths, default=(200, 200),
                   help="hidden layer widths, comma-separated (default: 200,200)")
    p.add_argument("--out", default=None,
                   help="run folder for the logs and the report (default: runs/demo-DATE-TIME)")
    p.add_argument("--no-report", action="store_true", help="skip the figures and summary.md")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (without a terminal the bar is replaced by a line every 10%% of the steps)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: 1 on machines with at most 2 cores, where a second thread "
                        "competes with other work for the cores; else torch's default)")
    return p


def demo_threads(requested: int | None, cores: int | None = None) -> int | None:
    """The torch thread count the demo sets: ``requested``, else 1 on machines with at most 2 cores
    (``os.cpu_count()``), else ``None`` (torch's default is kept).
    """
    if requested is not None:
        return requested
    cores = os.cpu_count() if cores is None else cores
    return 1 if cores is not None and cores <= 2 else None


def _run_demo(argv: Sequence[str]) -> int:
    args = _demo_parser().parse_args(list(argv))
    if args.n_train >= 1797:
        raise _UsageError(f"{PROG} demo: error: --n-train must be below 1797 (the rest is the test set), "
                          f"got {args.n_train}")
    _quiet_lightning()
    threads = demo_threads(args.threads)
    if threads is not None:
        torch.set_num_threads(threads)
        why = "" if args.threads is not None else f" ({os.cpu_count()} CPU cores; --threads N to change)"
        print(f"Using {threads} torch thread{'s' if threads > 1 else ''}{why}.", flush=True)
    try:
        res = run_demo(steps=args.steps, lr=args.lr, out=args.out, seed=args.seed, every=args.every,
                       top_k=args.top_k, n_train=args.n_train, hidden=args.hidden, report=not args.no_report,
                       progress=not args.no_progress)
    except (FileExistsError, ValueError) as err:
        raise _UsageError(f"{PROG} demo: error: {err}") from err
    print(format_summary(res))
    return 0


# -- report --------------------------------------------------------------------------------------
def _report_parser() -> _Parser:
    p = _Parser(
        prog=f"{PROG} report",
        description=(
            "Read the TensorBoard logs of one or more runs and write figures (sharpness against the "
            "stability threshold with the loss; the top eigenvalues with the most negative one; eigenvector "
            "rotation and polarity; and, for several runs, final sharpness and test accuracy against the "
            "learning rate) plus summary.md and summary.json with the numbers."
        ),
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="a run folder (searched for TensorBoard event files, sub-folders included) or an event file")
    p.add_argument("--out", default=None,
                   help="folder for the figures and summary (default: RUN_DIR/report for one folder, else "
                        "'report' in the folders' common parent)")
    p.add_argument("--rotation-threshold", type=float, default=0.7, dest="rotation_threshold",
                   help="a run counts as 'rotated' when the similarity between its first and final top-k "
                        "eigenvector subspace is below this value; 1 = unchanged, 0 = orthogonal (default: %(default)s)")
    p.add_argument("--prefix", default=None,
                   help=f"the monitor's tag prefix (default: the prefix in each run's run_card.json, else "
                        f"'{DEFAULT_PREFIX}')")
    p.add_argument("--warmup", type=float, default=DEFAULT_WARMUP,
                   help="fraction of the measured steps skipped before 'min lambda_min' is taken, so the value at "
                        "initialisation does not dominate (default: %(default)s)")
    return p


def _run_report(argv: Sequence[str]) -> int:
    args = _report_parser().parse_args(list(argv))
    try:
        res = write_report(args.run_dirs, out=args.out, rotation_threshold=args.rotation_threshold,
                           prefix=args.prefix, warmup=args.warmup)
    except (ReportError, ValueError) as err:
        raise _UsageError(f"{PROG} report: error: {err}") from err
    print(f"{len(res['summaries'])} run(s), {len(res['figures'])} figure(s) written to {res['out']}")
    print(f"summary: {res['markdown']}")
    return 0


# -- LightningCLI ----------------------------------------------------------------------------------
def _quiet_lightning() -> None:
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*is smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended.*")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(lambda r: "litlogger" not in r.getMessage())
    # The seed is recorded in the saved config.yaml; the log line would precede usage errors.
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)


class RPELightningCLI(LightningCLI):
    """LightningCLI with the package's defaults: digits data, the tanh MLP, and optional
    ``monitor:`` / ``controller:`` sections for the package's callbacks.
    """

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(SharpnessMonitor, "monitor", subclass_mode=True, required=False)
        parser.add_lightning_class_args(InstabilityController, "controller", subclass_mode=True, required=False)
        parser.set_defaults({"model": lazy_instance(MLPClassifier), "data": lazy_instance(DigitsDataModule)})

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(str(self.subcommand), self.config)
        if cfg.get("lr_scheduler") is not None and cfg.get("optimizer") is None:
            raise _UsageError(
                f"{PROG} {self.subcommand}: error: an lr_scheduler section needs a top-level optimizer section "
                "too (e.g. optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.05}}); the model's own "
                "optimizer argument cannot be combined with a scheduler from the config")
        if cfg.get("controller") is not None and cfg.get("monitor") is None and not _has_monitor(cfg):
            raise _UsageError(
                f"{PROG} {self.subcommand}: error: the controller section needs a SharpnessMonitor "
                "(add a monitor: section or a lightning_rpe.SharpnessMonitor in trainer.callbacks)")

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        keys = self._parser(self.subcommand).callback_keys
        extra = [c for c in (self._get(self.config_init, k) for k in keys) if c is not None]
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        callbacks = trainer_config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if (trainer_config.get("enable_progress_bar") is None and not _is_terminal(sys.stderr)
                and not any(isinstance(c, ProgressBar) for c in [*callbacks, *extra])):
            # Lightning's bar would write thousands of carriage-return updates into a log file
            trainer_config["enable_progress_bar"] = False
        return self._instantiate_trainer(trainer_config, extra)


def _has_monitor(cfg: Any) -> bool:
    callbacks = (cfg.get("trainer") or {}).get("callbacks") or []
    if not isinstance(callbacks, list):
        callbacks = [callbacks]
    for cb in callbacks:
        path = cb.get("class_path", "") if hasattr(cb, "get") else type(cb).__name__
        if str(path).endswith("SharpnessMonitor"):
            return True
    return False


def _run_lightning(argv: Sequence[str]) -> int:
    _quiet_lightning()
    parser_kwargs: dict[str, Any] = {"exit_on_error": False}
    for sub in LIGHTNING_COMMANDS:
        parser_kwargs[sub] = {"exit_on_error": False}
    try:
        cli = RPELightningCLI(
            args=list(argv),
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            parser_kwargs=parser_kwargs,
        )
    except _UsageError:
        raise
    except SystemExit as err:  # --help and --print_config exit with code 0
        return int(err.code or 0)
    except (argparse.ArgumentError, MisconfigurationException, FileNotFoundError, ValueError, TypeError,
            ImportError) as err:
        sub = argv[0] if argv else ""
        raise _UsageError(f"{PROG} {sub}: error: {_one_line(err)}") from err
    if argv and argv[0] == "fit" and cli.trainer.is_global_zero:
        print(fit_summary(cli.trainer))
    return 0


def fit_summary(trainer: Any) -> str:
    """What ``lightning-rpe fit`` prints at the end: the run folder, a short summary of the monitor's
    measurements (read back from the event files and the run card, like ``report``) and the
    ``report`` command for the figures.
    """
    log_dir = None if trainer.logger is None else getattr(trainer.logger, "log_dir", None)
    lines = [f"Finished {trainer.global_step} optimizer steps."]
    if log_dir is None or not any(Path(log_dir).glob("events.out.tfevents.*")):
        lines.append("No TensorBoard logger with a log folder: nothing to report (add trainer.logger: "
                     "lightning.pytorch.loggers.TensorBoardLogger).")
        return "\n".join(lines)
    run = load_run(log_dir)
    s = summarize(run)
    if s.optimizer is not None:
        lines[0] = (f"Finished {trainer.global_step} optimizer steps with {run.label()}; stability threshold "
                    f"{s.threshold_formula}.")
    if s.measurements:
        compared = "preconditioned sharpness" if s.final_preconditioned_sharpness is not None else "sharpness"
        value = s.final_preconditioned_sharpness if s.final_preconditioned_sharpness is not None else s.final_sharpness
        line = f"{s.measurements} Hessian measurements; final {compared} {value:.4g}"
        if s.final_threshold is not None and s.final_ratio is not None:
            line += (f" against the threshold {s.final_threshold:.4g}: stability ratio {s.final_ratio:.3f} "
                     f"(max {s.max_ratio:.3f})")
        lines.append(line + ".")
        if s.final_effective_lr is not None:
            lines.append(f"Controller ({s.controller}): final effective lr {s.final_effective_lr:.4g}"
                         + (f" (factor {s.final_lr_scale:.3g})" if s.final_lr_scale is not None else "") + ".")
    else:
        lines.append("No Hessian measurement was logged (add a monitor: section).")
    if s.final_train_loss is not None:
        lines.append(f"Final training loss {s.final_train_loss:.4g}"
                     + (f"; {s.test_acc_tag} {s.test_acc:.3f}." if s.test_acc is not None else "."))
    lines.append(f"Run folder: {log_dir}")
    lines.append(f"  TensorBoard: tensorboard --logdir {log_dir}")
    lines.append(f"  Figures:     {PROG} report {log_dir}")
    return "\n".join(lines)


def _one_line(err: BaseException) -> str:
    """The most specific reason in an exception chain, on one line.

    jsonargparse wraps a model's or callback's own ``ValueError`` (e.g. "top_k must be an int >= 1")
    in a generic "Does not validate against any of the Union subtypes" error; the original is the
    innermost exception of the chain (a ``raise ... from None`` ends the chain there), or one of the
    "- ..." lines of the message. jsonargparse's own type errors ("Expected a <class 'float'>. Got
    value: big") name neither the option nor, for a union, the other accepted types: both are added
    from the enclosing "Parser key" message.
    """
    chain: list[BaseException] = []
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        chain.append(cur)
        seen.add(id(cur))
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
    texts = [str(exc).strip() for exc in chain]
    reason = next((t.splitlines()[0].strip() for t in reversed(texts) if t and not t.startswith("Does not validate")),
                  None)
    if reason is None:
        text = str(err).strip() or type(err).__name__
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        reasons = [ln[2:] for ln in lines if ln.startswith("- ") and "NoneType" not in ln]
        reason = reasons[0] if reasons else lines[0]
    return _name_the_option(reason, texts)


_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_EXPECTED = re.compile(r"^\s*- Expected a (.+?)\s*$", re.MULTILINE)


def _name_the_option(reason: str, texts: Sequence[str]) -> str:
    """``reason`` prefixed with the innermost option jsonargparse named, and a union's accepted types."""
    if not reason.startswith("Expected a"):
        return reason
    inner = [t for t in texts if _PARSER_KEY.search(t)]
    if not inner:
        return reason
    key = _PARSER_KEY.findall(inner[-1])[-1]
    after = inner[-1][inner[-1].rindex(f'Parser key "{key}"'):]
    accepted = [_type_name(t) for t in _EXPECTED.findall(after)]
    got = re.search(r"Got value: (.*)$", reason) or re.search(r"Given value: (.*)$", after, re.MULTILINE)
    if len(accepted) < 2 or got is None:
        return f"{key}: {reason}"
    return f"{key}: expected {', '.join(accepted[:-1])} or {accepted[-1]}; got {got.group(1).strip()}"


def _type_name(text: str) -> str:
    """``<class 'float'>`` -> ``float``, ``typing.Literal['auto']`` -> ``'auto'``, NoneType -> ``null``."""
    text = text.strip()
    if text == "<class 'NoneType'>":
        return "null"
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", text)
    if literal:
        return literal.group(1)
    named = re.fullmatch(r"<class '(.*)'>", text)
    return named.group(1) if named else text


# -- entry point -------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-rpe``; returns the exit code (0 ok, 2 usage error)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if not args or args[0] in ("-h", "--help", "help"):
            print(_TOP_HELP)
            return 0
        if args[0] in ("-V", "--version"):
            print(f"{PROG} {__version__}")
            return 0
        command, rest = args[0], args[1:]
        if command == "demo":
            return _run_demo(rest)
        if command == "report":
            return _run_report(rest)
        if command in LIGHTNING_COMMANDS:
            return _run_lightning(args)
        raise _UsageError(f"{PROG}: error: unknown command {command!r}; choose from demo, "
                          f"{', '.join(LIGHTNING_COMMANDS)}, report (see {PROG} --help)")
    except _UsageError as err:
        print(str(err), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
