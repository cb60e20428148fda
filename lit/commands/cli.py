"""The ``lit`` command: argv dispatch and the top-level help, without importing torch.

``lit fit`` / ``lit test`` / ``lit predict`` run a YAML config through the LightningCLI of
:mod:`lit.commands.lightning_cli` (subclass mode: ``--model`` and ``--data`` take any
LightningModule / LightningDataModule by ``class_path``, e.g. ``models.retrieval.RetrievalEvaluator``,
with typed ``init_args``, so every option shows in ``lit fit --help`` and ``--print_config``).
The commands of :data:`EXTRA_COMMANDS` sit beside them (``lit report RUNS...`` collects Table 1,
see :mod:`lit.commands.table1`). Every command is imported by module name only when it runs,
so ``lit --help`` and the light commands answer without loading torch / Lightning.

- a mistake the user can fix ends with one line, ``error: <message>``, printed last, and
  exit status 2 (see :func:`user_error_message`); ``--debug`` or ``LIT_DEBUG=1`` shows the
  traceback instead;
- library warnings and log lines the user cannot act on (Lightning's tips, third-party
  deprecations) are silenced (:func:`quiet_known_warnings`); the suite's own warnings stay,
  and ``--debug`` shows everything.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Sequence

from lit.errors import UserError

#: ``lit NAME ...`` commands beside LightningCLI's fit/test/predict:
#: name -> (module, function taking the remaining argv, one-line help).
EXTRA_COMMANDS: dict[str, tuple[str, str, str]] = {
    "report": ("lit.commands.table1", "main", "collect the metrics.json of lit test runs into the paper's Table 1"),
    "export": ("lit.commands.export_options", "main", "write a checkpoint's backbone as a descriptor file, or a text-to-image checkpoint as a pipeline folder"),
    "scan": ("lit.commands.scan.options", "main", "search generated images against a training set and report what was copied"),
    "generate": ("lit.commands.generate_options", "main",
                 "generate images and memorization scores from a text-to-image pipeline folder for a set of prompts"),
}

EXIT_USER_ERROR = 2
DEBUG_FLAG = "--debug"
DEBUG_ENV = "LIT_DEBUG"
NO_VALIDATION = (
    "lit validate: no module of the suite has a validation loop; use `lit test` for retrieval "
    "metrics, and the ReplicationMonitor (in `lit fit`) for replication during training"
)


def commands_epilog() -> str:
    """The commands beside fit/test/predict, listed from :data:`EXTRA_COMMANDS`."""
    width = max(len(name) for name in EXTRA_COMMANDS) if EXTRA_COMMANDS else 0
    lines = ["other commands (lit NAME --help for their options):"]
    lines += [f"  {name:<{width}}  {help_text}" for name, (_, _, help_text) in EXTRA_COMMANDS.items()]
    lines += ["", f"A mistake ends with one line, 'error: ...'; {DEBUG_FLAG} (or {DEBUG_ENV}=1) shows the traceback."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- one-line errors
def exception_chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions it was raised from (``__cause__``, else ``__context__``)."""
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not s for s in seen):
        seen.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return seen


#: Exceptions that report a user's mistake wherever they are raised (the suite's own are all
#: :class:`UserError`: ``DatasetLayoutError``, ``ImageLoadError``...).
USER_ERROR_TYPES: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, NotADirectoryError)
#: Lightning's exception for a user's mistake (``MisconfigurationException``): matched by the
#: module that defines it, which is loaded only when a Lightning command runs (no torch here).
_LIGHTNING_USER_ERROR = ("lightning_fabric.utilities.exceptions", "MisconfigurationException")


def _user_error_types() -> tuple[type[BaseException], ...]:
    """:data:`USER_ERROR_TYPES`, plus Lightning's ``MisconfigurationException`` once Lightning is loaded."""
    module = sys.modules.get(_LIGHTNING_USER_ERROR[0])
    extra = getattr(module, _LIGHTNING_USER_ERROR[1], None)
    return USER_ERROR_TYPES + ((extra,) if isinstance(extra, type) else ())


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
    chain = exception_chain(error)
    for item in chain:
        if isinstance(item, argparse.ArgumentError):
            return parser_message(str(item))
    user_errors = _user_error_types()
    for item in chain:
        if isinstance(item, user_errors):
            message = str(item) if not isinstance(item, OSError) or item.filename is None else (
                f"{item.strerror or 'not found'}: {item.filename}")
            return " ".join(message.split())
    return None


def _debug_requested(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``; debug is on with the flag or ``LIT_DEBUG`` set (not 0)."""
    if DEBUG_FLAG in argv:
        os.environ[DEBUG_ENV] = "1"  # DDP workers re-run the command line: they inherit it
        argv = [a for a in argv if a != DEBUG_FLAG]
    return argv, _debugging()


#: Modules whose deprecation warnings are theirs to fix, not the user's.
_THIRD_PARTY = (r"(torch|torchvision|timm|lightning_fabric|pytorch_lightning|lightning|lightning_utilities|"
                r"jsonargparse|tensorboardX|tensorboard|huggingface_hub|safetensors|faiss|numpy|scipy|PIL|"
                r"matplotlib|pkg_resources|setuptools|tqdm|google|webdataset|diffusers|transformers|tokenizers)(\..*)?$")
#: Warnings a user of the suite cannot act on: (message regex, category, module regex) for
#: :func:`warnings.filterwarnings`. The suite's own warnings (``ImageSkipWarning``,
#: ``StaleLockWarning``, ``SyntheticSkipWarning``...) are not among them and always show.
KNOWN_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # Lightning: "The '...dataloader' does not have many workers ..." on tiny demo sets
    (".*does not have many workers.*", UserWarning, ""),
    # Lightning without tensorboard installed: "Starting from v1.9.0, `tensorboardX` has been removed ..."
    (".*`tensorboardX` has been removed as a dependency.*", UserWarning, ""),
    # Lightning at fit start: "Found N module(s) in eval mode": a text model's frozen text encoder / VAE,
    # kept in eval mode on purpose (models.text_diffusion)
    (r"Found \d+ module\(s\) in eval mode at the start of training.*", UserWarning, ""),
    # torch.utils._pytree's LeafSpec deprecation, raised from inside Lightning
    (".*LeafSpec.*", Warning, ""),
    # deprecations inside the libraries below: only their maintainers can act on them
    *(("", category, _THIRD_PARTY) for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning)),
)

#: Lightning's log lines that advertise, or restate the machine or the user's own settings.
KNOWN_LOG_LINES = re.compile(
    r"💡 Tip|litlogger|litmodels|(GPU|TPU|HPU|IPU) available:|"
    r"You are using a CUDA device|LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES|"
    r"`Trainer\.fit` stopped: `max_(steps|epochs)=\d+` reached|Trainer already configured with model summary|"
    r"`Trainer\(\w+=1(\.0)?\)` was configured so"  # the user's own limit_*_batches setting, restated
)
#: The loggers Lightning's ``rank_zero_info`` writes to (filters set on them before Lightning is
#: imported stay: ``logging.getLogger`` hands Lightning the same objects).
_LIGHTNING_LOGGERS = tuple(f"{package}.utilities.rank_zero" for package in (
    "pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric"))


class _DropKnownLines(logging.Filter):
    """Drop log records whose message matches :data:`KNOWN_LOG_LINES`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return KNOWN_LOG_LINES.search(record.getMessage()) is None


def quiet_known_warnings() -> None:
    """Silence the warnings of :data:`KNOWN_WARNINGS` (the suite's own warnings still show)."""
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def quiet_known_logs() -> None:
    """Drop :data:`KNOWN_LOG_LINES` from Lightning's loggers (before or after Lightning is imported)."""
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownLines) for f in logger.filters):
            logger.addFilter(_DropKnownLines())


def _debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


#: LightningCLI's subcommands (``lit validate`` is refused: no module has a validation loop).
LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "train a module (runs the full optimization routine)",
    "test": "evaluate a module once over the test set (e.g. retrieval metrics)",
    "predict": "run a module's predict_step (e.g. sample a DDPM)",
}
#: The module that holds the LightningCLI (imported by name: it loads torch and Lightning).
LIGHTNING_CLI_MODULE = "lit.commands.lightning_cli"
HELP_FLAGS = ("-h", "--help")


def top_level_help() -> str:
    """``lit --help``: the Lightning subcommands and :data:`EXTRA_COMMANDS` (built without torch)."""
    names = ",".join(LIGHTNING_COMMANDS)
    width = max(len(name) for name in LIGHTNING_COMMANDS)
    lines = [
        f"usage: lit [-c CONFIG] {{{names}}} ...",
        "       lit NAME ...",
        "",
        "lit: find whether a diffusion model copies its training data (fit / test / predict with a YAML config).",
        "",
        "subcommands (lit SUBCOMMAND --help for every option of the trainer, model and data):",
        *(f"  {name:<{width}}  {text}" for name, text in LIGHTNING_COMMANDS.items()),
        "",
        "options:",
        "  -h, --help            Show this help message and exit.",
        "  -c CONFIG, --config CONFIG",
        "                        Path to a configuration file in json or yaml format.",
        "",
    ]
    return "\n".join(lines) + "\n" + commands_epilog()


def _run(argv: list[str], from_sys_argv: bool) -> None:
    if argv[:1] and argv[0] in EXTRA_COMMANDS:
        module, function, _ = EXTRA_COMMANDS[argv[0]]
        getattr(importlib.import_module(module), function)(argv[1:])
        return
    if argv[:1] == ["validate"]:
        raise UserError(NO_VALIDATION)
    if argv[:1] and argv[0] in HELP_FLAGS:
        print(top_level_help(), end="")
        raise SystemExit(0)
    importlib.import_module(LIGHTNING_CLI_MODULE).run(argv, from_sys_argv)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``lit`` console script; a user's mistake exits 2 after ``error: <message>``."""
    argv, debug = _debug_requested(list(sys.argv[1:] if args is None else args))
    if args is None:
        sys.argv[1:] = argv
    if not debug:
        quiet_known_warnings()
        quiet_known_logs()
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
