"""The server in-process (Starlette's TestClient): greedy output equals `generate`, batched rows
equal rows alone (also rows that join a running batch), stop strings, SSE, echo/logprobs, chat,
the attention map, and every error in OpenAI's shape, after which the server still answers."""

from __future__ import annotations

import json
import queue

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

from minigpt import GPTModel, generate, get_preset, optimize_for_cpu  # noqa: E402
from minigpt.inspection import attention_maps  # noqa: E402
from minigpt.serving import Engine, Limits, RowSpec, chat_prompt, create_app  # noqa: E402
from minigpt.serving.rows import Row  # noqa: E402
from minigpt.tokenizer import EOS_ID  # noqa: E402

PROMPTS = ["Every effort moves you", "Hello", "The quick brown fox jumps over the lazy dog, and then"]


@pytest.fixture(scope="module")
def model() -> GPTModel:
    torch.manual_seed(123)
    return optimize_for_cpu(GPTModel(get_preset("tiny")).eval())


@pytest.fixture(scope="module")
def app(model, tokenizer):
    app = create_app(model, tokenizer, "tiny", Limits(max_tokens=40, max_n=3, max_rows=6, max_body=4000))
    yield app
    app.state.service.close()


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


def alone(model, tokenizer, prompt: str, max_tokens: int, **kw) -> str:
    ids = tokenizer.encode(prompt)
    out = generate(model, [ids], max_tokens, eos_id=EOS_ID, **kw)[0][len(ids):]
    return tokenizer.decode(out)


def post(client, path: str, **body):
    return client.post(path, json={"model": "tiny", **body})


def test_greedy_completions_equal_generate(client, model, tokenizer):
    r = post(client, "/v1/completions", prompt=PROMPTS, max_tokens=12, temperature=0)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert [c["text"] for c in body["choices"]] == [alone(model, tokenizer, p, 12) for p in PROMPTS]
    assert [c["finish_reason"] for c in body["choices"]] == ["length"] * 3
    n_prompt = sum(len(tokenizer.encode(p)) for p in PROMPTS)
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 36, "total_tokens": n_prompt + 36}


def test_seeded_sampling_equals_generate_and_repeats(client, model, tokenizer):
    kw = dict(prompt=PROMPTS[0], max_tokens=10, temperature=0.9, top_k=50, top_p=0.95, seed=7)
    first, again = (post(client, "/v1/completions", **kw).json()["choices"][0]["text"] for _ in range(2))
    assert first == again == alone(model, tokenizer, PROMPTS[0], 10, temperature=0.9, top_k=50, top_p=0.95,
                                   generator=7)
    n = post(client, "/v1/completions", **{**kw, "n": 3}).json()["choices"]
    assert n[0]["text"] == first and len({c["text"] for c in n}) == 3  # choice i uses seed + i


def run_rows(engine: Engine, specs: list[RowSpec]) -> list[list]:
    """Every row's events, collected until all finished."""
    events: queue.Queue = queue.Queue()
    engine.submit(specs, events.put)
    got: list[list] = [[] for _ in specs]
    left = len(specs)
    while left:
        event = events.get(timeout=60)
        got[event.row].append(event)
        left -= event.finish is not None
    return got


def test_rows_batched_and_joining_equal_rows_alone(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=4)
    try:
        prompts = [tokenizer.encode(p) for p in PROMPTS] + [[EOS_ID]]
        expected = [generate(model, [p], 20)[0][len(p):] for p in prompts]
        got = run_rows(engine, [RowSpec(p, 20, temperature=0.0, logprobs=0) for p in prompts])
        assert [[t.token_id for e in row for t in e.tokens] for row in got] == expected
        assert engine.peak_batch == 4
        # A long row starts alone; shorter and longer ones join it while it runs.
        events: queue.Queue = queue.Queue()
        engine.submit([RowSpec(prompts[1], 30, logprobs=0)], events.put)
        first = events.get(timeout=60)
        late = run_rows(engine, [RowSpec(p, 10, logprobs=0) for p in (prompts[2], prompts[0])])
        rest = [first] + [events.get(timeout=60) for _ in range(29)]
        tokens = [t.token_id for e in rest for t in e.tokens if e.row == 0]
        assert tokens == generate(model, [prompts[1]], 30)[0][len(prompts[1]):]
        assert [[t.token_id for e in row for t in e.tokens] for row in late] == \
            [generate(model, [p], 10)[0][len(p):] for p in (prompts[2], prompts[0])]
        assert engine.stats()["running"] == 0 and engine.batch.cache is None
    finally:
        engine.close()


def test_stop_string_across_token_boundaries(client, model, tokenizer):
    full = alone(model, tokenizer, PROMPTS[0], 12)
    ids = tokenizer.encode(PROMPTS[0])
    pieces = [tokenizer.decode([t]) for t in generate(model, [ids], 12)[0][len(ids):]]
    boundary = len(pieces[0]) + len(pieces[1]) + len(pieces[2])
    stop = full[boundary - 2:boundary + 2]  # two characters either side of a token boundary
    assert len(stop) == 4
    cut = full[:full.index(stop)]
    choice = post(client, "/v1/completions", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                  stop=[stop, "never appears"]).json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (cut, "stop")
    chunks = stream_chunks(client, "/v1/completions", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=stop)
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut


def stream_chunks(client, path: str, **body) -> list[dict]:
    """The JSON chunks of a streamed response, checking the SSE framing and the final [DONE]."""
    with client.stream("POST", path, json={"model": "tiny", "stream": True, **body}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    events = text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1])
    return [json.loads(e.removeprefix("data: ")) for e in events[:-2]]


def test_stream_joined_equals_the_whole_response(client):
    kw = dict(prompt=PROMPTS[:2], max_tokens=9, temperature=0, n=2, seed=1)
    whole = post(client, "/v1/completions", **kw).json()
    chunks = stream_chunks(client, "/v1/completions", stream_options={"include_usage": True}, **kw)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    for i, choice in enumerate(whole["choices"]):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert [c["finish_reason"] for c in mine][-1] == "length" and mine[-1]["finish_reason"] == "length"
        assert all(c["finish_reason"] is None for c in mine[:-1])


def test_echo_and_logprobs(client, model, tokenizer):
    body = post(client, "/v1/completions", prompt=PROMPTS[0], max_tokens=4, temperature=0, echo=True,
                logprobs=2).json()
    choice, ids = body["choices"][0], tokenizer.encode(PROMPTS[0])
    assert choice["text"] == PROMPTS[0] + alone(model, tokenizer, PROMPTS[0], 4)
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 4 and "".join(lp["tokens"]) == choice["text"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    assert lp["token_logprobs"][1] == pytest.approx(float(full[0, ids[1]]), abs=1e-4)
    greedy_first = lp["top_logprobs"][len(ids)]  # greedy: the chosen token is the most likely
    assert max(greedy_first.values()) == pytest.approx(lp["token_logprobs"][len(ids)], abs=1e-5)
    assert lp["text_offset"][len(ids)] == len(PROMPTS[0])


def test_chat_template_and_chat_completion(client, model, tokenizer):
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi!"}]
    assert chat_prompt(messages) == "System: Be terse.\n\nUser: Hi!\n\nAssistant:"
    body = post(client, "/v1/chat/completions", messages=messages, max_tokens=8, temperature=0).json()
    message = body["choices"][0]["message"]
    assert body["object"] == "chat.completion" and message["role"] == "assistant"
    assert message["content"] == alone(model, tokenizer, chat_prompt(messages), 8).lstrip()
    chunks = stream_chunks(client, "/v1/chat/completions", messages=messages, max_tokens=8, temperature=0)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == message["content"]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    body = post(client, "/v1/chat/completions", messages=messages, max_tokens=5, temperature=0, logprobs=True,
                top_logprobs=2).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == 5
    assert all(len(t["top_logprobs"]) == 2 and t["logprob"] == t["top_logprobs"][0]["logprob"] for t in content)
    assert bytes(sum((t["bytes"] for t in content), [])).decode().lstrip() == body["choices"][0]["message"]["content"]


def test_models_health_playground_and_attention(client, model, tokenizer):
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert client.get("/v1/models/tiny").json()["context_length"] == 64
    assert client.get("/health").json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and 'id="heatmap"' in page.text and "http" not in page.text.split("<script>")[1]
    r = post(client, "/v1/attention", prompt=PROMPTS[0], layer=1, head=2).json()
    ids = tokenizer.encode(PROMPTS[0])
    expected = attention_maps(model, torch.tensor(ids), 1)[2]
    assert len(r["tokens"]) == len(ids) and (r["n_layers"], r["n_heads"]) == (2, 4)
    assert torch.allclose(torch.tensor(r["weights"]), expected, atol=1e-4)
    assert post(client, "/v1/attention", prompt="x", layer=5).status_code == 400


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": "x", "temperature": -1}, 400, "temperature must be >= 0"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p must be in (0, 1]"),
    ({"prompt": "x", "top_k": 0}, 400, "top_k must be >= 1"),
    ({"prompt": "x", "top_k": 50258}, 400, "<= the vocabulary size 50257"),
    ({"prompt": "x", "max_tokens": 41}, 400, "over this server's cap of 40"),
    ({"prompt": "x", "n": 4}, 400, "n must be in [1, 3]"),
    ({"prompt": ["a", "b", "c"], "n": 3}, 400, "cap of 6 sequences"),
    ({"prompt": "word " * 70}, 400, "prompt 0 is 71 tokens, 7 more than the model's context of 64"),
    ({"prompt": [[1, 2, 60000]]}, 400, "outside the vocabulary"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "does not exist"),
    ({"prompt": 5}, 422, "prompt must be"),
    ({"prompt": "x", "max_tokens": "ten"}, 422, "max_tokens must be an integer"),
    ({"prompt": "x", "stream": 1}, 422, "stream must be a boolean"),
    ({"max_tokens": 3}, 422, "prompt is required"),
])
def test_errors_in_openai_shape(client, body, status, words):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert client.get("/health").status_code == 200  # the server is still there


def test_transport_errors(client, app):
    assert client.post("/v1/completions", content=b"{not json").status_code == 400
    r = client.post("/v1/completions", content=b'{"prompt": "' + b"x" * 5000 + b'"}')
    assert r.status_code == 413 and "4000 bytes" in r.json()["error"]["message"]
    assert client.get("/v2/nothing").json()["error"]["code"] == "not_found"
    assert client.get("/v1/completions").status_code == 405
    assert post(client, "/v1/chat/completions", messages=[{"role": "robot", "content": "x"}]).status_code == 400
    engine = app.state.service.engine
    engine.max_waiting, saved = 0, engine.max_waiting
    try:
        r = post(client, "/v1/completions", prompt="x")
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
    finally:
        engine.max_waiting = saved
    assert post(client, "/v1/completions", prompt="x", max_tokens=2).status_code == 200


def test_api_key(model, tokenizer):
    app = create_app(model, tokenizer, "tiny", api_key="sesame")
    try:
        with TestClient(app) as c:
            assert c.get("/v1/models").status_code == 401
            r = c.get("/v1/models", headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert c.get("/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200
            assert c.get("/health").status_code == 200  # open: a liveness probe has no key
    finally:
        app.state.service.close()


def test_a_character_split_over_tokens_streams_whole(model, tokenizer):
    # Emoji are four bytes, which GPT-2 splits over tokens: the text must still arrive whole.
    text = "a \u20ac b \U0001F600"
    ids = tokenizer.encode(text)
    got: list = []
    row = Row(RowSpec([EOS_ID], len(ids)), 0, tokenizer, got.append, torch.device("cpu"))
    assert [row.add(t, torch.zeros(model.cfg.vocab_size)) for t in ids][-1]
    assert "".join(e.text for e in got) == text and got[-1].finish == "length"
    assert all("\ufffd" not in e.text for e in got)


def test_a_failing_step_ends_its_rows_not_the_server(client, app, monkeypatch):
    def broken() -> torch.Tensor:
        raise RuntimeError("a bug in a decoding step")

    monkeypatch.setattr(app.state.service.engine.batch, "step", broken)
    r = post(client, "/v1/completions", prompt="x", max_tokens=5)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    monkeypatch.undo()
    assert post(client, "/v1/completions", prompt="x", max_tokens=5).json()["usage"]["completion_tokens"] == 5
