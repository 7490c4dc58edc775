"""The command line keeps its word: overrides after the options, did-you-mean, values named with their source."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llava_cluster.cli import main


def write_spec(tmp: Path, tiny) -> Path:
    spec = {"name": "cli", "storage": str(tmp / "storage"), "model": {"base": str(tiny.model)},
            "data": {"train": str(tiny.train), "image_folder": str(tiny.images)}, "resources": {"gpus_per_node": 1}}
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_overrides_after_the_options_are_applied(tmp_path, tiny_dir, capsys):
    spec = write_spec(tmp_path, tiny_dir)
    assert main(["submit", str(spec), "--dry-run", "name=renamed", "optim.lr=1e-4"]) == 0
    assert "runs/renamed" in capsys.readouterr().out
    assert main(["plan", str(spec), "--model-shape", "7b", "--json", "optim.per_device_batch=2"]) in (0, 1)
    assert '"batch": 2' in capsys.readouterr().out


def test_a_real_unknown_argument_is_still_an_error(tmp_path, tiny_dir):
    with pytest.raises(SystemExit) as exit_info:
        main(["submit", str(write_spec(tmp_path, tiny_dir)), "--dry-run", "--bakend", "slurm"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("override, expected", [
    ("optim.lrr=1e-4", "did you mean 'optim.lr'?"),
    ("trainig.precision=bf16", "did you mean 'training'?"),
    ("optim.lr=fast", "got 'fast'"),
    ("model.template=vicuna", "did you mean 'vicuna_v1'?"),
])
def test_spec_mistakes_say_what_was_meant_and_where_the_value_came_from(tmp_path, tiny_dir, capsys, override,
                                                                          expected):
    assert main(["submit", str(write_spec(tmp_path, tiny_dir)), "--dry-run", override]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert expected in err
    if "did you mean 'training'" not in expected:
        assert f"[from the command line: {override}]" in err


def _epilogs(parser) -> list[str]:
    """The epilog of this parser and of every subcommand under it."""
    import argparse

    found = [parser.epilog or ""]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _epilogs(sub)
    return found


def help_examples() -> list[str]:
    """Every `llava-cluster ...` example line of every --help, its trailing explanation cut off."""
    import re

    from llava_cluster.cli import COMMANDS, EPILOG, build_parser

    texts = [EPILOG]
    for name, *_ in COMMANDS:
        texts += _epilogs(build_parser([name])._subparsers._group_actions[0].choices[name])
    examples = []
    for text in texts:
        for line in re.sub(r"\s*\\\n\s*", " ", text).splitlines():  # continued lines joined
            if line.strip().startswith("llava-cluster "):
                examples.append(re.split(r"\s{2,}|\s#|\s[>|]\s", line.strip())[0])  # explanation, redirection
    return examples


def test_every_help_names_examples():
    from llava_cluster.cli import COMMANDS

    commands = {example.split()[1] for example in help_examples()}
    assert commands == {name for name, *_ in COMMANDS}


@pytest.mark.parametrize("example", help_examples())
def test_every_help_example_parses_as_written(example):
    """The real parser, as `main` reads a line (overrides anywhere): no 'unrecognized arguments'."""
    import shlex

    from llava_cluster.cli import parse

    _, args = parse(shlex.split(example)[1:])
    assert callable(args.func), example


def test_every_help_is_fast_it_imports_neither_torch_nor_transformers():
    """Each command module registers at import: heavy libraries belong in the handlers, run after parsing."""
    import subprocess
    import sys

    probe = """
import sys
from llava_cluster.cli import COMMANDS, build_parser, main
helps = []
for name, *_ in COMMANDS:
    helps.append([name])
    command = build_parser([name])._subparsers._group_actions[0].choices[name]
    for action in command._subparsers._group_actions if command._subparsers else ():
        helps += [[name, sub] for sub in action.choices]
for argv in helps:
    try:
        main([*argv, "--help"])
    except SystemExit:
        pass
print(len(helps), [m for m in ("torch", "transformers", "peft", "deepspeed") if m in sys.modules])
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    count, heavy = result.stdout.strip().splitlines()[-1].split(" ", 1)
    assert heavy == "[]"
    assert int(count) >= 12 + 4 + 2  # every command, data's 4 and convert's 2 subcommands


def test_verbose_reaches_the_child_processes_through_the_environment(tmp_path, monkeypatch):
    import os

    from llava_cluster.noise import VERBOSE_ENV, quiet, verbose

    monkeypatch.setenv(VERBOSE_ENV, "")  # undone after the test, whatever main sets
    assert main(["status", str(tmp_path / "none")]) == 2 and not verbose()
    assert main(["-v", "status", str(tmp_path / "none")]) == 2
    assert os.environ[VERBOSE_ENV] == "1" and verbose()
    os.environ[VERBOSE_ENV] = ""
    quiet()
