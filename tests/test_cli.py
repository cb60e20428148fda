"""The ``lit`` command: a run never overwrites a user's files, mistakes end in one line
(``error: ...``, exit status 2), no option abbreviations, and the commands it offers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lit.commands import cli
from lit.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _retrieval_config(folder: Path, **data: object) -> Path:
    """A seconds-long ``lit test`` config: pixel descriptor, 4 procedural queries, no logger given."""
    config = {
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"class_path": "models.retrieval.RetrievalEvaluator", "init_args": {"descriptor": {"name": "pixel"}}},
        "data": {"class_path": "datamodules.retrieval.ProceduralRetrievalDataModule",
                 "init_args": {"num_queries": 4, "copies_per_query": 1, "num_distractors": 3, "image_size": 16,
                               "batch_size": 4, **data}},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fails(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``lit ARGS`` in this process; it must exit with status 2; returns the last line printed."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).strip().splitlines()  # the error goes to stderr, after stdout is flushed
    assert captured.err.strip().splitlines()[-1] == lines[-1]
    return lines[-1]


def test_user_files_survive_a_run_without_logger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`lit test -c config.yaml --trainer.logger false` in a folder holding the user's own config.yaml,
    metrics.json and metrics.md: they are kept, and the run writes into a fresh lit_runs/version_N."""
    monkeypatch.chdir(tmp_path)
    config = _retrieval_config(tmp_path)
    mine = {"config.yaml": config.read_text(), "metrics.json": '{"mine": 1}\n', "metrics.md": "my notes\n"}
    for name, text in mine.items():
        (tmp_path / name).write_text(text)
    for run in range(2):
        cli.main(["test", "-c", "config.yaml", "--trainer.logger", "false"])
        folder = tmp_path / "lit_runs" / f"version_{run}"
        assert json.loads((folder / "metrics.json").read_text())["num_queries"] == 4
        assert yaml.safe_load((folder / "config.yaml").read_text())["trainer"]["logger"] is False
        assert (folder / "metrics.md").is_file() and (folder / "retrievals.png").is_file()
    assert {name: (tmp_path / name).read_text() for name in mine} == mine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "lit_runs", "metrics.json", "metrics.md"]
    capsys.readouterr()


def test_a_config_yaml_in_the_log_folder_is_not_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "runs" / "fixed" / "version_0"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("mine\n")
    last = _fails(["test", "-c", str(_retrieval_config(tmp_path)),
                   "--trainer.logger.class_path=pytorch_lightning.loggers.CSVLogger",
                   f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", "--trainer.logger.init_args.name=fixed",
                   "--trainer.logger.init_args.version=0"], capsys)
    assert last.startswith(f"error: {folder / 'config.yaml'} already exists and this run did not write it")
    assert (folder / "config.yaml").read_text() == "mine\n"


@pytest.mark.parametrize(("overrides", "expected"), [
    (["--model.init_args.descriptor.name=sscd_resnet50", "--model.init_args.descriptor.weights=/no/such/sscd.pt"],
     "error: descriptor.weights: weights file not found: /no/such/sscd.pt (expected the SSCD TorchScript file"),
    (["--model.init_args.descriptor.name=nope"],
     "error: descriptor.name: unknown descriptor 'nope'; available: sscd_resnet50"),
    (["--data.init_args.batch_size=0"], "error: ProceduralRetrievalDataModule: batch_size must be >= 1, got 0"),
    (["--data.class_path=datamodules.retrieval.FolderRetrievalDataModule", "--data.init_args.root=/no/such/folder"],
     "error: image folder not found: /no/such/folder"),
    (["--model.init_args.k=abc"], "error: model.init_args.k: expected int, got value: abc"),
    (["--model.init_args.descriptor.token_normalization=l2"],
     "error: model.init_args.descriptor.token_normalization: expected typing.Literal"),
    (["--trainer.max_steps=x"], "error: trainer.max_steps: expected int, got value: x"),
    (["--model.init_args.not_an_option=1"], "error: model.init_args: Option 'not_an_option' is not accepted"),
])
def test_user_errors_end_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     overrides: list[str], expected: str) -> None:
    last = _fails(["test", "-c", str(_retrieval_config(tmp_path)), "--trainer.logger=false",
                   f"--trainer.default_root_dir={tmp_path}", *overrides], capsys)
    assert last.startswith(expected), last
    if "token_normalization" in expected:
        assert last.endswith("got value: l2")


def test_debug_shows_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["test", "-c", str(_retrieval_config(tmp_path, batch_size=0)), "--trainer.logger=false"]
    monkeypatch.setenv(cli.DEBUG_ENV, "0")  # restored after the test (main sets it to 1 for --debug)
    with pytest.raises(UserError, match="batch_size must be >= 1"):
        cli.main([*args, "--debug"])
    assert os.environ[cli.DEBUG_ENV] == "1"  # inherited by DDP workers
    with pytest.raises(UserError, match="batch_size must be >= 1"):
        cli.main(args)  # LIT_DEBUG=1 alone


def test_the_console_command_exits_2_with_the_error_last(tmp_path: Path) -> None:
    """The issue's case, as a user runs it: a missing weights file ends with one line and status 2."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop(cli.DEBUG_ENV, None)
    done = subprocess.run(
        [sys.executable, "-m", "lit.commands.cli", "test", "-c", str(_retrieval_config(tmp_path)), "--trainer.logger=false",
         "--model.init_args.descriptor.name=sscd_resnet50",
         f"--model.init_args.descriptor.weights={tmp_path / 'missing.pt'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"error: descriptor.weights: weights file not found: {tmp_path / 'missing.pt'}")
    assert "Traceback" not in done.stderr


def test_abbreviated_options_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(_retrieval_config(tmp_path))
    assert _fails(["test", "-c", config, "--trainer.max_step", "5", "--print_config"], capsys) == (
        "error: unrecognized arguments: --trainer.max_step 5")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["test", "-c", config, "--trainer.max_steps", "5", "--print_config"])
    assert exit_info.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["max_steps"] == 5


def test_help_lists_every_command(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(cli.EXTRA_COMMANDS, "frobnicate", ("lit.commands.table1", "main", "a command added to the table"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code in (0, None)
    text = capsys.readouterr().out
    assert "usage: lit" in text and "{fit,test,predict}" in text and "validate" not in text
    for name, (_, _, help_text) in cli.EXTRA_COMMANDS.items():
        assert any(line.split() == [name, *help_text.split()] for line in text.splitlines()), name
    assert "report" in cli.EXTRA_COMMANDS


def test_validate_and_predict_without_support_are_one_line_errors(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    config = str(_retrieval_config(tmp_path))
    assert _fails(["validate", "-c", config], capsys).startswith("error: lit validate: no module of the suite")
    last = _fails(["predict", "-c", config, "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"], capsys)
    assert last.startswith("error: RetrievalEvaluator does not support lit predict")


def test_report_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _fails(["report", str(tmp_path / "nope")], capsys) == f"error: no such runs folder: {tmp_path / 'nope'}"
    assert _fails(["report"], capsys).startswith("error: lit report: the following arguments are required: runs")


def test_parser_message_names_key_and_value() -> None:
    text = ('Parser key "data":\n  Does not validate against any of the Union subtypes\n  Subtypes: [...]\n'
            "  Errors:\n    - Problem with given class_path 'datamodules.retrieval.X':\n"
            '        Parser key "batch_size":\n          Expected a <class \'int\'>. Got value: x\n'
            "    - Expected a <class 'NoneType'>\n  Given value type: <class 'jsonargparse._util.NestedArg'>\n")
    assert cli.parser_message(text) == "data.init_args.batch_size: expected int, got value: x"
    assert cli.parser_message("unrecognized arguments: --a 1") == "unrecognized arguments: --a 1"
