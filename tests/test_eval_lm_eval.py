"""The lm-evaluation-harness: minigpt's adapter answers each request type as lm-eval's own `hf`
model does on the same weights, in process and through the harness's command line (local YAML
tasks over a local jsonl, a minigpt checkpoint and its export by `python -m minigpt.convert`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minigpt.checkpoint import save_model
from minigpt.convert import main as convert_main
from minigpt.eval import main as eval_main
from tests.hf_utils import copy_hf_into_minigpt, random_hf_gpt2

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's hf model needs it (lm-eval[hf])
tiktoken_load = pytest.importorskip("tiktoken.load")

BPE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"

TASKS = {
    "minigpt_test_choice": """
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "minigpt_test_rolling": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    "minigpt_test_generate": """
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n\\n", "."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""",
}

DOCS = [
    {"question": "The capital of France is", "choices": [" Paris", " a cheese", " blue and green"], "label": 0,
     "answer": " Paris", "text": "Every effort moves you. " * 6 + "Grüße aus Köln, naïve café ✓"},
    {"question": "Two plus two equals", "choices": [" four", " fish", " the moon"], "label": 0, "answer": " four",
     "text": "I had always thought Jack Gisburn rather a cheap genius."},
    {"question": "A man is sitting on a roof. he", "choices": [" is ripping level tiles off.", " sleeps",
                                                               " starts pulling up roofing."],
     "label": 2, "answer": " starts", "text": "Short."},
]


def random_model():
    return random_hf_gpt2(n_layer=2, n_head=4, n_embd=32, vocab=50257, n_positions=64, seed=3)


def write_tokenizer_files(directory: Path) -> None:
    """tiktoken's cached copies of GPT-2's BPE files are Hugging Face's vocab.json and merges.txt."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_bytes(tiktoken_load.read_file_cached(BPE_URL + "encoder.json"))
    (directory / "merges.txt").write_bytes(tiktoken_load.read_file_cached(BPE_URL + "vocab.bpe"))


def requests(kind: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_each_request_type_answers_as_lm_evals_hf_model(tmp_path):
    from lm_eval.models.huggingface import HFLM
    from transformers import GPT2TokenizerFast

    from minigpt.evaluation.lm_eval_model import MinigptLM

    hf = random_model()
    write_tokenizer_files(tmp_path)
    tokenizer = GPT2TokenizerFast(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    theirs = HFLM(pretrained=hf, tokenizer=tokenizer, batch_size=2, device="cpu")
    mine = MinigptLM(model=copy_hf_into_minigpt(hf), batch_size=3)
    pairs = [(d["question"], c) for d in DOCS for c in d["choices"]] + [("", "Hello world"), ("Ends in space ", "x")]
    for got, want in zip(mine.loglikelihood(requests("loglikelihood", pairs)),
                         theirs.loglikelihood(requests("loglikelihood", pairs)), strict=True):
        assert got[0] == pytest.approx(want[0], rel=1e-5) and got[1] == want[1]
    # The last text spans three 64-token windows. (Not one word repeated: the hf model then shares
    # logits between windows of equal tokens but different context lengths, and its sum depends
    # on the batch size.)
    texts = [(d["text"],) for d in DOCS] + [(" ".join(f"item{i}," for i in range(60)),)]
    got = mine.loglikelihood_rolling(requests("loglikelihood_rolling", texts))
    assert got == pytest.approx(theirs.loglikelihood_rolling(requests("loglikelihood_rolling", texts)), rel=1e-5)
    prompts = [(d["question"], {"until": ["."], "max_gen_toks": 10, "do_sample": False}) for d in DOCS]
    prompts.append((" ".join(f"item{i}," for i in range(40)), {"until": "\n", "max_gen_toks": 5}))  # cut to fit
    assert mine.generate_until(requests("generate_until", prompts)) == \
        theirs.generate_until(requests("generate_until", prompts))


def test_model_args(tmp_path):
    from minigpt.errors import ConfigError
    from minigpt.evaluation.lm_eval_model import MinigptLM

    lm = MinigptLM.create_from_arg_string("preset=tiny,seed=0,dtype=bfloat16", {"batch_size": "auto", "device": "cpu"})
    assert (lm.max_length, lm.batch_size, str(lm.model.tok_emb.weight.dtype)) == (64, 8, "torch.bfloat16")
    with pytest.raises(ConfigError, match="unknown --model_args for minigpt: dtpye"):
        MinigptLM.create_from_arg_string("preset=tiny,dtpye=bfloat16")
    with pytest.raises(ConfigError, match="needs one of checkpoint=DIR"):
        MinigptLM.create_from_arg_string("checkpoint=a,pretrained=gpt2")


@pytest.fixture(scope="module")
def same_weights(tmp_path_factory):
    """A minigpt checkpoint and its Hugging Face export (with GPT-2's tokenizer files)."""
    root = tmp_path_factory.mktemp("lm-eval")
    save_model(copy_hf_into_minigpt(random_model()), root / "minigpt")
    assert convert_main(["--from", "minigpt", str(root / "minigpt"), "--to", "hf", str(root / "hf")]) == 0
    write_tokenizer_files(root / "hf")
    tasks = root / "tasks"
    tasks.mkdir()
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    for name, body in TASKS.items():
        head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        (tasks / f"{name}.yaml").write_text(head + body, encoding="utf-8")
    return root


def run_harness(root: Path, model: str, model_args: str, out: Path) -> tuple[dict, dict]:
    """Run the tasks through lm-eval's command line; (metrics per task, responses per task)."""
    code = eval_main(["lm-eval", "--model", model, "--model_args", model_args, "--tasks", ",".join(TASKS),
                      "--include_path", str(root / "tasks"), "--device", "cpu", "--batch_size", "2",
                      "--output_path", str(out), "--log_samples"])
    assert code in (0, None)
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    responses = {}
    for task in TASKS:
        lines = next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()
        responses[task] = [json.loads(line)["filtered_resps"] for line in lines]
    return results, responses


@pytest.mark.slow  # two harness runs: about a minute on a 2-core CPU
def test_minigpt_and_hf_give_the_same_metrics(same_weights, monkeypatch):
    for offline in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(offline, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(same_weights / "datasets-cache"))
    mine, mine_resps = run_harness(same_weights, "minigpt", f"checkpoint={same_weights / 'minigpt'}",
                                   same_weights / "out-minigpt")
    theirs, theirs_resps = run_harness(same_weights, "hf", f"pretrained={same_weights / 'hf'}",
                                       same_weights / "out-hf")
    assert mine_resps["minigpt_test_generate"] == theirs_resps["minigpt_test_generate"]
    assert any(r[0] for r in mine_resps["minigpt_test_generate"])  # some text was generated
    for task in TASKS:
        metrics = {k: v for k, v in mine[task].items() if k != "alias" and "stderr" not in k}
        assert metrics, task
        for key, value in metrics.items():
            assert value == pytest.approx(theirs[task][key], rel=1e-5, abs=1e-6), (task, key)
    # The logged responses are strings: (log-likelihood, is_greedy) per choice, the log-likelihood per text.
    for a, b in zip(mine_resps["minigpt_test_choice"], theirs_resps["minigpt_test_choice"], strict=True):
        assert [float(x) for x, _ in a] == pytest.approx([float(x) for x, _ in b], rel=1e-5)
        assert [greedy for _, greedy in a] == [greedy for _, greedy in b]
    for a, b in zip(mine_resps["minigpt_test_rolling"], theirs_resps["minigpt_test_rolling"], strict=True):
        assert float(a[0]) == pytest.approx(float(b[0]), rel=1e-5)
