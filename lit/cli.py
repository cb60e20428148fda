"""The ``lit`` command: a LightningCLI over every module and datamodule of the suite.

``lit report RUNS...`` collects the metrics.json of ``lit test`` runs into the
paper's Table 1 (see :mod:`lit.table1`). Subclass mode: ``--model`` and ``--data`` take any LightningModule /
LightningDataModule by ``class_path`` (e.g. ``models.retrieval.RetrievalEvaluator``)
with typed ``init_args``, so every option shows in ``--help`` and
``--print_config``.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings

from pytorch_lightning import LightningDataModule, LightningModule
from pytorch_lightning.cli import LightningCLI


class LitCLI(LightningCLI):
    """LightningCLI with the suite's defaults: subclass mode, config saved with overwrite."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            model_class=LightningModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )


def _quiet_known_warnings() -> None:
    """Silence library warnings that say nothing actionable to a user of the suite."""
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


#: ``lit NAME ...`` commands beside LightningCLI's fit/test/predict:
#: name -> (module, function taking the remaining argv, one-line help).
EXTRA_COMMANDS: dict[str, tuple[str, str, str]] = {
    "report": ("lit.table1", "main", "collect the metrics.json of lit test runs into the paper's Table 1"),
    "scan": ("lit.scan", "main", "search generated images against a training set and report what was copied"),
}


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lit`` console script (``lit report`` collects Table 1)."""
    argv = sys.argv[1:] if args is None else args
    if argv[:1] and argv[0] in EXTRA_COMMANDS:
        module, function, _ = EXTRA_COMMANDS[argv[0]]
        getattr(importlib.import_module(module), function)(argv[1:])
        return
    _quiet_known_warnings()
    LitCLI(args=args)


if __name__ == "__main__":
    main()
