"""`scripts/gpu_check.sh` parses and calls only commands and flags that exist (it can't run without a GPU)."""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _items() -> list[list[str]]:
    """Each `item NAME COMMAND...` line as its words, with ${TRAIN[@]} expanded."""
    text = SCRIPT.read_text()
    train = shlex.split(re.search(r"^TRAIN=\((.*?)\)", text, re.S | re.M).group(1).replace("\n", " "))
    items = []
    for line in text.splitlines():
        if line.startswith("item "):
            words = shlex.split(line.replace('"${TRAIN[@]}"', " ".join(train)))
            items.append(words[1:])
    return items


def _help(argv: list[str]) -> str:
    result = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.slow  # a --help per command: a few seconds each
def test_every_item_calls_existing_commands_with_existing_flags():
    items = _items()
    names = [words[0] for words in items]
    assert {"cuda-tests", "bench-quick", "train-bf16", "train-bf16-compile", "torchrun-1", "generate-bf16",
            "peak-memory"} <= set(names)
    helps: dict[str, str] = {}
    for name, *cmd in items:
        if cmd[1] == "-c":
            continue  # inline Python
        if cmd[1] == "-m" and cmd[2] == "torch.distributed.run":
            cmd = [cmd[0], *cmd[cmd.index("-m", 3):]]  # the module torchrun launches
        target = cmd[1:3] if cmd[1] == "-m" else cmd[1:2]
        if target[0] == "-m" and target[1] == "pytest":
            assert (ROOT / cmd[-1]).is_dir(), name
            continue
        if target[0] != "-m":
            assert (ROOT / target[0]).is_file(), f"{name}: {target[0]} does not exist"
        key = " ".join(target)
        helps.setdefault(key, _help(target))
        flags = [w for w in cmd if w.startswith("--")]
        missing = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", helps[key])]
        assert not missing, f"{name}: {key} has no {missing}"


def test_the_script_names_its_items_and_generate_takes_its_flags():
    from minigpt.cli.generate import build_parser

    names = [words[0] for words in _items()]
    assert len(names) == len(set(names)) >= 8
    generate_help = build_parser().format_help()
    assert all(flag in generate_help for flag in ("--device", "--dtype", "--weights", "--max-new-tokens"))
