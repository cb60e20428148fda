"""The ``lit`` command: a LightningCLI over every module and datamodule of the suite.

``lit fit`` / ``lit test`` / ``lit predict`` run a YAML config (subclass mode: ``--model``
and ``--data`` take any LightningModule / LightningDataModule by ``class_path``, e.g.
``models.retrieval.RetrievalEvaluator``, with typed ``init_args``, so every option shows
in ``--help`` and ``--print_config``). The commands of :data:`EXTRA_COMMANDS` sit beside
them (``lit report RUNS...`` collects Table 1, see :mod:`lit.commands.table1`).

Safe by default:

- a run writes into a folder of its own: the logger's fresh ``version_N``, or, without a
  logger (``--trainer.logger false``), a fresh ``<default_root_dir>/lit_runs/version_N``;
  a ``config.yaml`` that the run did not write is never overwritten (one-line error);
- option names must be spelled out (no abbreviations: ``--trainer.max_step`` is refused);
- a mistake the user can fix ends with one line, ``error: <message>``, printed last, and
  exit status 2 (see :func:`user_error_message`); ``--debug`` or ``LIT_DEBUG=1`` shows the
  traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytorch_lightning as pl
from jsonargparse import DefaultHelpFormatter
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning import LightningDataModule, LightningModule
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback

from lit.errors import UserError

#: ``lit NAME ...`` commands beside LightningCLI's fit/test/predict:
#: name -> (module, function taking the remaining argv, one-line help).
EXTRA_COMMANDS: dict[str, tuple[str, str, str]] = {
    "report": ("lit.commands.table1", "main", "collect the metrics.json of lit test runs into the paper's Table 1"),
    "export": ("lit.commands.export", "main", "write a checkpoint's trained backbone as a descriptor file (safetensors)"),
    "scan": ("lit.commands.scan.command", "main", "search generated images against a training set and report what was copied"),
}

#: Where a run without a logger writes (under the trainer's ``default_root_dir``).
RUNS_FOLDER = "lit_runs"
EXIT_USER_ERROR = 2
DEBUG_FLAG = "--debug"
DEBUG_ENV = "LIT_DEBUG"
_NO_VALIDATION = (
    "lit validate: no module of the suite has a validation loop; use `lit test` for retrieval "
    "metrics, and the ReplicationMonitor (in `lit fit`) for replication during training"
)


class _KeepLinesFormatter(DefaultHelpFormatter):
    """jsonargparse's help formatter, but the description / epilog keep their line breaks."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


def _commands_epilog() -> str:
    """The commands beside fit/test/predict, listed from :data:`EXTRA_COMMANDS`."""
    width = max(len(name) for name in EXTRA_COMMANDS) if EXTRA_COMMANDS else 0
    lines = ["other commands (lit NAME --help for their options):"]
    lines += [f"  {name:<{width}}  {help_text}" for name, (_, _, help_text) in EXTRA_COMMANDS.items()]
    lines += ["", f"A mistake ends with one line, 'error: ...'; {DEBUG_FLAG} (or {DEBUG_ENV}=1) shows the traceback."]
    return "\n".join(lines) + "\n"


def fresh_run_folder(root: str | Path) -> Path:
    """Create and return ``root/lit_runs/version_N`` for the first N not taken (atomic ``mkdir``)."""
    parent = Path(root) / RUNS_FOLDER
    parent.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in parent.iterdir() if (m := re.fullmatch(r"version_(\d+)", p.name))]
    version = max(taken, default=-1) + 1
    while True:
        folder = parent / f"version_{version}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:  # another run took it meanwhile
            version += 1


class RunFolder(pl.Callback):
    """Without a logger, move the run's ``default_root_dir`` (its ``log_dir``) to a fresh folder.

    Lightning's ``log_dir`` falls back to ``default_root_dir`` (the working directory unless
    set) when there is no logger, so ``config.yaml``, ``metrics.json``, checkpoints and
    figures would land among the user's files. Rank 0 creates the folder, every rank uses it.
    """

    def __init__(self) -> None:
        self.folder: Path | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.loggers or self.folder is not None:
            return
        created = str(fresh_run_folder(trainer.default_root_dir)) if trainer.is_global_zero else None
        self.folder = Path(trainer.strategy.broadcast(created))
        trainer._default_root_dir = str(self.folder)  # read back by trainer.log_dir and ModelCheckpoint


class SafeSaveConfig(SaveConfigCallback):
    """Save ``config.yaml`` into the run folder; refuse (one line) when one is already there."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.already_saved and self.save_to_log_dir:
            path = Path(trainer.log_dir or trainer.default_root_dir) / self.config_filename
            exists = trainer.strategy.broadcast(path.exists() if trainer.is_global_zero else False)
            if exists:
                raise UserError(
                    f"{path} already exists and this run did not write it: give the logger another "
                    "save_dir / name / version (or remove the file) so that nothing is overwritten"
                )
        super().setup(trainer, pl_module, stage)


class LitCLI(LightningCLI):
    """LightningCLI with the suite's defaults: subclass mode, a run folder of its own, no abbreviations.

    ``exit_on_error=False`` makes a parser error raise (``lit.commands.cli.main`` prints it as one
    line); the default keeps jsonargparse's usage message and exit for Python callers.
    """

    def __init__(self, args: list[str] | None = None, run: bool = True, exit_on_error: bool = True) -> None:
        common = {"allow_abbrev": False, "exit_on_error": exit_on_error}
        super().__init__(
            model_class=LightningModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=SafeSaveConfig,
            save_config_kwargs={"overwrite": False},
            parser_kwargs={
                **common,
                "prog": "lit",
                "description": "lit: find whether a diffusion model copies its training data "
                "(fit / test / predict with a YAML config).",
                "epilog": _commands_epilog(),
                "formatter_class": _KeepLinesFormatter,
                **{name: dict(common) for name in self.subcommands()},
            },
            args=args,
            run=run,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, test and predict (no module of the suite has a validation loop: ``lit validate`` is an error)."""
        commands = dict(LightningCLI.subcommands())
        commands.pop("validate", None)
        return commands

    def instantiate_classes(self) -> None:
        """Instantiate; a value a class rejects in ``__init__`` becomes a one-line :class:`UserError`."""
        try:
            super().instantiate_classes()
        except Exception as error:
            converted = _config_error(error)
            if converted is None:
                raise
            raise converted from error

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.insert(0, RunFolder())  # before anything asks for trainer.log_dir
        return trainer

    def before_predict(self) -> None:
        """``lit predict`` needs a module with its own ``predict_step``."""
        if type(self.model).predict_step is LightningModule.predict_step:
            raise UserError(
                f"{type(self.model).__name__} does not support lit predict (it has no predict_step); "
                "use lit test for retrieval metrics, lit predict with models.ddpm.DDPMModule for samples"
            )


# ---------------------------------------------------------------------- one-line errors
def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions it was raised from (``__cause__``, else ``__context__``)."""
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not s for s in seen):
        seen.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return seen


_WRAPPERS = ("jsonargparse", "pytorch_lightning.cli")


def _raised_by(error: BaseException) -> tuple[str, str | None]:
    """(module of the frame that raised ``error``, class whose ``__init__`` it came from, if any)."""
    module, owner = "", None
    traceback: TracebackType | None = error.__traceback__
    while traceback is not None:
        frame = traceback.tb_frame
        module = str(frame.f_globals.get("__name__", ""))
        instance = frame.f_locals.get("self")
        if frame.f_code.co_name == "__init__" and instance is not None and not module.startswith(_WRAPPERS):
            owner = type(instance).__name__
        traceback = traceback.tb_next
    return module, owner


def _config_error(error: Exception) -> UserError | None:
    """A value rejected by a configured class's ``__init__`` (ValueError / TypeError, under
    jsonargparse's wrappers) as a :class:`UserError` naming the class; None otherwise."""
    for item in _chain(error):
        module, owner = _raised_by(item)
        if module.startswith(_WRAPPERS):
            continue  # jsonargparse's "Does not validate against any of the Union subtypes ..."
        if isinstance(item, (ValueError, TypeError, MisconfigurationException)) and not isinstance(item, UserError):
            return UserError(f"{owner}: {item}" if owner else str(item))
        return None
    return None


#: Exceptions that report a user's mistake wherever they are raised (the suite's own are all
#: :class:`UserError`: ``DatasetLayoutError``, ``ImageLoadError``...).
USER_ERROR_TYPES: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, NotADirectoryError,
                                                     MisconfigurationException)


_PARSER_NOISE = ("Does not validate against", "Subtypes:", "Errors:", "Given value", "Expected a <class 'NoneType'>")


def parser_message(text: str) -> str:
    """jsonargparse's multi-line error as one line that names the option and the value.

    ``Parser key "model": ... Problem with given class_path 'X': Parser key "k": Expected a
    <class 'int'>. Got value: abc`` -> ``model.init_args.k: expected int, got value: abc``.
    """
    keys: list[str] = []
    detail: str | None = None
    for raw in text.splitlines():
        line = raw.strip().removeprefix("- ").strip()
        if not line or detail is not None:
            continue
        if match := re.match(r'Parser key "([^"]+)":\s*(.*)', line):
            keys.append(match.group(1))
            detail = match.group(2) or None
        elif match := re.match(r"Problem with given class_path '([^']+)':\s*(.*)", line):
            keys.append("init_args")
            detail = match.group(2) or None
        elif line.startswith(_PARSER_NOISE):
            continue
        else:
            detail = line
    if detail is None:
        return " ".join(text.split())
    detail = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", detail)
    detail = re.sub(r"^Expected an? (.*?)\. Got value: ", r"expected \1, got value: ", detail)
    return f"{'.'.join(keys)}: {detail}" if keys else detail


def user_error_message(error: BaseException) -> str | None:
    """The one-line message of a user's mistake in ``error`` (or what it wraps); None for a bug."""
    chain = _chain(error)
    for item in chain:
        if isinstance(item, argparse.ArgumentError):
            return parser_message(str(item))
    for item in chain:
        if isinstance(item, USER_ERROR_TYPES):
            message = str(item) if not isinstance(item, OSError) or item.filename is None else (
                f"{item.strerror or 'not found'}: {item.filename}")
            return " ".join(message.split())
    return None


def _debug_requested(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``; debug is on with the flag or ``LIT_DEBUG`` set (not 0)."""
    if DEBUG_FLAG in argv:
        os.environ[DEBUG_ENV] = "1"  # DDP workers re-run the command line: they inherit it
        argv = [a for a in argv if a != DEBUG_FLAG]
    return argv, os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _quiet_known_warnings() -> None:
    """Silence library warnings that say nothing actionable to a user of the suite."""
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _run(argv: list[str], from_sys_argv: bool) -> None:
    if argv[:1] and argv[0] in EXTRA_COMMANDS:
        module, function, _ = EXTRA_COMMANDS[argv[0]]
        getattr(importlib.import_module(module), function)(argv[1:])
        return
    if argv[:1] == ["validate"]:
        raise UserError(_NO_VALIDATION)
    _quiet_known_warnings()
    # from the console: LightningCLI reads sys.argv itself (it warns when given both)
    LitCLI(args=None if from_sys_argv else argv, exit_on_error=False)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``lit`` console script; a user's mistake exits 2 after ``error: <message>``."""
    argv, debug = _debug_requested(list(sys.argv[1:] if args is None else args))
    if args is None:
        sys.argv[1:] = argv
    try:
        _run(argv, from_sys_argv=args is None)
    except Exception as error:
        message = user_error_message(error)
        if message is None or debug:
            raise
        sys.stdout.flush()
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None


if __name__ == "__main__":
    main()
