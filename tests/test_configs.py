"""Every YAML in configs/ must parse with ``--print_config`` (no silently dropped keys)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lit.commands.lightning_cli import LitCLI

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
# option files of ``lit scan`` (no LightningCLI model) print through lit scan: tests/test_scan.py
CONFIGS = [c for c in CONFIGS if "model" in (yaml.safe_load(c.read_text()) or {})]


def _subcommand(config: Path) -> str:
    """Evaluation configs run with ``test``, training configs with ``fit``."""
    model = yaml.safe_load(config.read_text())["model"]["class_path"]
    return "test" if model.endswith("RetrievalEvaluator") else "fit"


def _required_overrides(config: Path, tmp_path: Path) -> list[str]:
    """Fill data paths that a config leaves to the user (its only required arguments)."""
    data = yaml.safe_load(config.read_text()).get("data", {}).get("init_args", {}) or {}
    return [f"--data.init_args.{key}={tmp_path}" for key, value in data.items() if value is None and key in {"root", "ground_truth"}]


def test_there_are_configs() -> None:
    assert any(c.name == "demo_retrieval.yaml" for c in CONFIGS)


def _leaves(node: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], Any]]:
    """(key path, value) of every leaf of a parsed YAML; lists of scalars are leaves, lists holding
    mappings (callbacks) are walked by position."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(node, list) and any(isinstance(v, (dict, list)) for v in node):
        for index, value in enumerate(node):
            yield from _leaves(value, (*path, index))
    else:
        yield path, node


def _at(node: Any, path: tuple[str | int, ...]) -> Any:
    for key in path:
        node = node[key]
    return node


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_config_prints(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [_subcommand(config), "-c", str(config), *_required_overrides(config, tmp_path), "--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        LitCLI(args=args)
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    source = yaml.safe_load(config.read_text())
    assert printed["model"]["class_path"] == source["model"]["class_path"]
    for key, value in (source["model"].get("init_args") or {}).items():
        assert printed["model"]["init_args"][key] == value, key
    # every leaf of the source (trainer, callbacks, model, data, seed) is printed with its value
    overrides = _required_overrides(config, tmp_path)
    overridden = {("data", "init_args", arg.split("=")[0].rsplit(".", 1)[-1]) for arg in overrides}
    leaves = list(_leaves(source))
    assert len(leaves) > 3
    for path, value in leaves:
        expected = str(tmp_path) if path in overridden else value
        try:
            got = _at(printed, path)
        except (KeyError, IndexError, TypeError):
            pytest.fail(f"{'.'.join(map(str, path))} of {config.name} is missing from the printed config")
        assert got == expected, path


@pytest.mark.parametrize("line", ["    k: 1000\n", "      name: pixel\n"], ids=["init_args", "descriptor"])
def test_unknown_key_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str) -> None:
    config = next(c for c in CONFIGS if c.name == "demo_retrieval.yaml")
    bad = tmp_path / "bad.yaml"
    text = config.read_text()
    assert line in text
    indent = line[: len(line) - len(line.lstrip())]
    bad.write_text(text.replace(line, f"{line}{indent}not_an_option: 3\n"))
    with pytest.raises(SystemExit) as exit_info:
        LitCLI(args=["test", "-c", str(bad), "--print_config"])
    assert exit_info.value.code != 0
    assert "not_an_option" in capsys.readouterr().err
