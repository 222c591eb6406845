"""The README runs as written.

- Every ```python block runs, each as its own script, in a fresh directory where the set-up's
  `gentrace record` has just run (a block that must not run says why in `<!-- not-run: reason -->`).
- Every shell block marked `<!-- example -->` parses: each `gentrace ...` command names an existing
  subcommand (typer's click tree of gentrace.cli.app), every `--option` exists for it, every concrete
  choice is one of the option's, and every `--set` / `--grid` key is a config key.
- The analyses the set-up paragraph says the quick start feeds are the ones `gentrace record`
  suggests for its store, and each returns rows on it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
import typer.main

import gentrace
from gentrace.analyses.registry import REGISTRY
from gentrace.cli.app import app
from gentrace.core.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*([\w-]+)(?::\s*(.*?))?\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced block of the README: its language tag, text (dedented), first line, and marker comment."""

    lang: str
    text: str
    line: int
    marker: str = ""
    reason: str = ""


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown text, each with the HTML comment on the line before its fence."""
    lines = text.splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opened = FENCE.match(lines[i])
        if not opened:
            i += 1
            continue
        indent, lang = opened.group(1), opened.group(2)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        body = [line[len(indent) :] if line.startswith(indent) else line.lstrip() for line in lines[i + 1 : end]]
        marked = MARKER.match(lines[i - 1]) if i > 0 else None
        marker, reason = (marked.group(1), marked.group(2) or "") if marked else ("", "")
        found.append(Block(lang, "\n".join(body) + "\n", i + 2, marker, reason))
        i = end + 1
    return found


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))
PYTHON = [block for block in BLOCKS if block.lang == "python"]
EXAMPLES = [block for block in BLOCKS if block.marker == "example"]


def config_keys(cls: type = RunConfig, prefix: str = "") -> set[str]:
    """Every key `--set` takes: each field of the config tree, tables included (`train.lr_decay`)."""
    keys = set()
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        keys.add(key)
        value = field.default if field.default is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(value):
            keys |= config_keys(type(value), key + ".")
    return keys


CONFIG_KEYS = config_keys()


def commands(text: str) -> Iterator[list[str]]:
    """The `gentrace ...` invocations of a shell block, each as its words from `gentrace` on.

    A line ending in a backslash continues on the next; so does an indented line starting with `[` or `-`
    (the Usage block's wrapped synopsis). `$ ` prompts, `# comments`, `&&`, `|` and `;` are shell; the
    program is `gentrace`, `.venv/bin/gentrace` or `python -m gentrace` / `torchrun ... -m gentrace`.
    """
    joined: list[str] = []
    for line in text.splitlines():
        if joined and (joined[-1].endswith("\\") or re.match(r"^\s+[\[-]", line)):
            joined[-1] = joined[-1].rstrip("\\") + " " + line.strip()
        else:
            joined.append(line)
    for line in joined:
        try:
            words = shlex.split(line.strip().removeprefix("$ "), comments=True)
        except ValueError:  # not shell (a store layout, program output): its words as they stand
            words = line.split()
        segment: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", "|", ";", "||"):
                start = next((k for k, w in enumerate(segment) if Path(w).name == "gentrace"), None)
                if start is not None and (start == 0 or segment[start - 1] == "-m" or "/" in segment[start]):
                    yield segment[start:]
                segment = []
            else:
                segment.append(word)


def choices_of(param: Any) -> list[str] | None:
    """An option's choices: click's Choice type, or (typer >= 0.2x, its own parameters) the annotated enum."""
    kind = getattr(param, "type", None)
    if kind is not None and hasattr(kind, "choices"):
        return list(kind.choices)
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return [member.value for member in annotation]
    return None


def problems(words: list[str]) -> list[str]:
    """What is wrong with one `gentrace ...` command against the real command line (empty: it parses)."""
    command: Any = typer.main.get_command(app)
    path: list[str] = []
    rest = words[1:]
    while hasattr(command, "commands"):
        where = " ".join(["gentrace", *path])
        if not rest:
            return [f"{where}: no subcommand"]
        names = rest[0].strip("[]").split("|")
        missing = [name for name in names if name not in command.commands]
        if missing:
            return [f"{where} has no subcommand {missing[0]!r}"]
        if len(names) > 1:  # `plot trajectory|lipschitz ...`: each alternative takes the options given
            return [issue for name in names for issue in problems(["gentrace", *path, name, *rest[1:]])]
        path.append(names[0])
        command = command.commands[names[0]]
        rest = rest[1:]
    where = " ".join(["gentrace", *path])
    options = {opt: param for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    found = []
    k = 0
    while k < len(rest):
        word = rest[k].strip("[]")
        k += 1
        if not word.startswith("-") or word == "-":
            continue
        name, _, inline = word.partition("=")
        param = options.get(name)
        if param is None:
            found.append(f"{where} has no option {name}")
            continue
        if param.is_flag:
            continue
        value = inline or (rest[k].strip("[]") if k < len(rest) else "")
        k += 0 if inline else 1
        choices = choices_of(param)
        if choices is not None:  # `--by model|layer|param`: every value that is not a placeholder (N, F, FILE)
            concrete = [v for v in value.split("|") if v and not v.isupper()]
            found += [f"{where} {name} {v!r} is not one of {list(choices)}" for v in concrete if v not in choices]
        if name in ("--set", "--grid"):
            key = value.partition("=")[0]
            if key and not key.isupper() and key not in CONFIG_KEYS:
                found.append(f"{where} {name} {key}: not a config key")
    return found


def test_readme_has_the_blocks_these_tests_read() -> None:
    assert len(PYTHON) >= 4
    assert any("gentrace analyze mi" in block.text and "gentrace plot mi" in block.text for block in EXAMPLES)
    assert sum(1 for block in EXAMPLES for _ in commands(block.text)) >= 25


def test_every_shell_block_with_a_gentrace_command_is_marked() -> None:
    shell = [block for block in BLOCKS if block.lang in ("", "sh", "bash", "console")]
    unmarked = [block.line for block in shell if not block.marker and any(commands(block.text))]
    assert not unmarked, f"README blocks at lines {unmarked}: mark them <!-- example --> so they are checked"


def test_not_run_blocks_say_why() -> None:
    skipped = [block for block in PYTHON if block.marker == "not-run"]
    assert all(len(block.reason) > 20 for block in skipped)
    assert len(skipped) <= 1, "run the README's Python, do not mark it away"


@pytest.mark.parametrize("block", EXAMPLES, ids=[f"line{block.line}" for block in EXAMPLES])
def test_example_commands_parse(block: Block) -> None:
    found = [issue for words in commands(block.text) for issue in problems(words)]
    assert not found, f"README line {block.line}: {found}"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("gentrace record --out x.zarr --set train.lr=0.1", []),
        ("gentrace analyse gsnr run.zarr", ["gentrace has no subcommand 'analyse'"]),
        ("gentrace analyze gsnr run.zarr --bogus 3", ["gentrace analyze gsnr has no option --bogus"]),
        ("gentrace analyze paths run.zarr [--kind overlap|crosss]", ["'crosss' is not one of"]),
        ("gentrace record --set train.lrr=0.1", ["--set train.lrr: not a config key"]),
        ("gentrace sweep C.toml --grid data.ntrain=1,2 --out d", ["--grid data.ntrain: not a config key"]),
        ("gentrace plot trajectory|lipschitz S -o f.png --where x", ["has no option --where"] * 2),
        ("torchrun --nproc-per-node 2 -m gentrace record C.toml --outt x", ["has no option --outt"]),
        (".venv/bin/pip install -e . && .venv/bin/gentrace recrd", ["no subcommand 'recrd'"]),
    ],
)
def test_command_check_finds_what_is_wrong(line: str, expected: list[str]) -> None:
    found = [issue for words in commands(line) for issue in problems(words)]
    assert len(found) == len(expected)
    assert all(part in issue for part, issue in zip(expected, found, strict=True))


@pytest.fixture(scope="module")
def set_up(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A fresh directory after the set-up's `gentrace record`: (the directory, record's stderr)."""
    cwd = tmp_path_factory.mktemp("readme")
    done = subprocess.run(
        [sys.executable, "-m", "gentrace", "record"], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    return cwd, done.stderr


RUN = [block for block in PYTHON if block.marker != "not-run"]


@pytest.mark.parametrize("block", RUN, ids=[f"line{block.line}" for block in RUN])
def test_python_block_runs(block: Block, set_up: tuple[Path, str], tmp_path: Path) -> None:
    cwd, _ = set_up
    script = tmp_path / f"readme_line{block.line}.py"
    script.write_text(block.text)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"README line {block.line}:\n{done.stderr[-3000:]}"


def claimed_analyses() -> list[str]:
    """The analyses the set-up paragraph says the quick-start store feeds (its `<!-- quickstart-feeds -->` line)."""
    text = README.read_text(encoding="utf-8")
    line = next(line for line in text.splitlines() if "<!-- quickstart-feeds -->" in line)
    return re.findall(r"`([a-z]+)`", line)


def test_quickstart_feeds_what_the_readme_and_the_hints_say(set_up: tuple[Path, str]) -> None:
    cwd, stderr = set_up
    claimed = claimed_analyses()
    assert set(claimed) <= set(REGISTRY)
    hinted = set(re.findall(r"gentrace analyze ([a-z]+) ", stderr))
    assert hinted == set(claimed)
    (store,) = (cwd / "runs").glob("quickstart-*.zarr")
    for name in claimed:
        assert len(gentrace.analyze(store, name)) > 0, name
