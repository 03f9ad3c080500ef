"""The command-line layer: one small module per `python -m minigpt.X` command, plus `common`."""
