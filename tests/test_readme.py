"""The README's Python examples run as written, and every name it imports from minigpt exists.

OpenAI's download is not possible here: a small GPT-2 (GPT-2's vocabulary and context, one thin
block) is written in OpenAI's exact file layout into `$MINIGPT_MODELS_DIR/124M`, where
`from_pretrained("gpt2")` finds it and downloads nothing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hf_utils import random_hf_gpt2
from test_weights_openai import openai_hparams, openai_variables, write_openai_checkpoint

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)
IMPORTED = sorted({name.strip() for group in re.findall(r"from minigpt import ([\w, ]+)", README)
                   for name in group.split(",") if name.strip()})


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    pytest.importorskip("tensorflow")
    root = tmp_path_factory.mktemp("models")
    hf = random_hf_gpt2(n_layer=1, n_head=2, n_embd=16, vocab=50257, n_positions=1024, seed=3)
    write_openai_checkpoint(root / "124M", openai_variables(hf), openai_hparams(hf))
    return root


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 3 and len(IMPORTED) >= 10


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, models_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINIGPT_MODELS_DIR", str(models_dir))
    monkeypatch.chdir(tmp_path)
    code = compile(BLOCKS[index], f"README.md python block {index + 1}", "exec")
    exec(code, {"__name__": "__readme__"})
    printed = capsys.readouterr().out
    # A print line ending in "# a / b" states the two numbers it prints.
    for first, second in re.findall(r"^print\(.*\)\s+# ([\d,]+) / ([\d,]+)$", BLOCKS[index], flags=re.M):
        assert f"{int(first.replace(',', ''))} {int(second.replace(',', ''))}" in printed


def test_every_name_the_readme_imports_exists_in_a_fresh_interpreter():
    code = f"import minigpt; missing = [n for n in {IMPORTED!r} if not hasattr(minigpt, n)]; print(missing)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("module", ["minigpt.cli.generate", "minigpt.generation", "minigpt.cli.train",
                                    "minigpt.training", "minigpt.book", "minigpt.classifier"])
def test_generate_is_the_function_after_importing_any_module(module):
    code = (f"import importlib; importlib.import_module({module!r}); "
            "from minigpt import generate, train_model_simple; "
            "print(callable(generate) and generate.__module__, train_model_simple.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.split() == ["minigpt.generation", "minigpt.book"]
