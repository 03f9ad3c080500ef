"""Evaluating a GPT: held-out perplexity and bits per byte, HellaSwag, the lm-evaluation-harness.

`python -m minigpt.eval` (`minigpt.cli.eval`) runs them from the command line. The harness
adapter, `minigpt.evaluation.lm_eval_model`, needs the optional `lm-eval` package and is imported
only by whoever uses it.
"""

from .hellaswag import (HellaSwagChoice, HellaSwagExample, hellaswag_accuracy, hellaswag_file, read_hellaswag,
                        score_hellaswag)
from .perplexity import PerplexityResult, evaluate_perplexity, sliding_windows
from .scoring import TailScore, score_tails, token_byte_lengths

__all__ = ["HellaSwagChoice", "HellaSwagExample", "hellaswag_accuracy", "hellaswag_file", "read_hellaswag",
           "score_hellaswag", "PerplexityResult", "evaluate_perplexity", "sliding_windows", "TailScore",
           "score_tails", "token_byte_lengths"]
