"""Every command's --help shows useful defaults only: no "(default: None)", no True/False of a
switch, no flag naming its default twice."""

import contextlib
import io
import re

import pytest

from minigpt.cli import classify, eval as eval_cli, generate, serve, train

HELPS = [(train.main, []), (generate.main, []), (serve.main, []), (classify.main, ["train"]),
         (classify.main, ["evaluate"]), (eval_cli.main, ["perplexity"]), (eval_cli.main, ["hellaswag"])]


@pytest.mark.parametrize("main, sub", HELPS, ids=[f"{m.__module__.rsplit('.', 1)[-1]} {' '.join(s)}" for m, s in HELPS])
def test_help_shows_only_meaningful_defaults(main, sub):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main([*sub, "--help"])
    assert done.value.code == 0
    text = out.getvalue()
    assert "usage:" in text
    assert not re.search(r"\(default: (None|True|False)\)", text), text
    entries = re.split(r"\n  (?=-)", text)
    assert all(entry.count("(default") <= 1 for entry in entries), [e for e in entries if e.count("(default") > 1]
    if main is train.main:
        assert "passes over the training split (default: 10)" in " ".join(text.split())  # real defaults stay
