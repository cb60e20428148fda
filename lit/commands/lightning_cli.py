"""The LightningCLI behind ``lit fit`` / ``lit test`` / ``lit predict`` (heavy: imports torch and Lightning).

:mod:`lit.commands.cli` imports this module by name only when a Lightning subcommand runs, so
``lit --help``, ``lit report`` and the other light commands start without torch.

Safe by default:

- a run writes into a folder of its own: the logger's fresh ``version_N``, or, without a
  logger (``--trainer.logger false``), a fresh ``<default_root_dir>/lit_runs/version_N``;
  a ``config.yaml`` that the run did not write is never overwritten (one-line error);
- option names must be spelled out (no abbreviations: ``--trainer.max_step`` is refused);
- a value a configured class rejects becomes a one-line :class:`~lit.errors.UserError`.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import TracebackType
from typing import Any

import pytorch_lightning as pl
from jsonargparse import DefaultHelpFormatter
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning import LightningDataModule, LightningModule
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback

from lit.commands.cli import commands_epilog, exception_chain
from lit.errors import UserError

#: Where a run without a logger writes (under the trainer's ``default_root_dir``).
RUNS_FOLDER = "lit_runs"


class _KeepLinesFormatter(DefaultHelpFormatter):
    """jsonargparse's help formatter, but the description / epilog keep their line breaks."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


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
                "epilog": commands_epilog(),
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
    for item in exception_chain(error):
        module, owner = _raised_by(item)
        if module.startswith(_WRAPPERS):
            continue  # jsonargparse's "Does not validate against any of the Union subtypes ..."
        if isinstance(item, (ValueError, TypeError, MisconfigurationException)) and not isinstance(item, UserError):
            return UserError(f"{owner}: {item}" if owner else str(item))
        return None
    return None



def run(argv: list[str], from_sys_argv: bool) -> None:
    """Run ``lit fit|test|predict ...``; from the console LightningCLI reads ``sys.argv`` itself
    (it warns when given both)."""
    LitCLI(args=None if from_sys_argv else argv, exit_on_error=False)
