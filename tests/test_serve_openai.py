"""The server under uvicorn on 127.0.0.1 (a free port, stopped by the test), with the real `openai`
package as the client: completions, list prompts, n, stop, seed, streaming, chat, every error,
clients at once getting the tokens each would get alone, a client that hangs up mid-stream, and
`python -m minigpt.serve` itself."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from minigpt import GPTConfig, GPTModel, generate, optimize_for_cpu  # noqa: E402
from minigpt.serving import Limits, chat_prompt, create_app  # noqa: E402
from minigpt.tokenizer import EOS_ID  # noqa: E402

PROMPTS = ["Every effort moves you", "Hello", "The quick brown fox jumps over the lazy dog, and then", "1 2 3"]


@contextmanager
def live_server(app) -> Iterator[str]:
    """Serve `app` with uvicorn on 127.0.0.1 at a free port, in a thread; stop it on exit."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started or not thread.is_alive():
            break
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def model() -> GPTModel:
    torch.manual_seed(7)
    cfg = GPTConfig(context_length=1024, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0)
    return optimize_for_cpu(GPTModel(cfg).eval())


@pytest.fixture(scope="module")
def app(model, tokenizer):
    app = create_app(model, tokenizer, "small", Limits(max_tokens=1000, max_n=4, max_body=20_000), max_batch=8)
    yield app
    app.state.service.close()


@pytest.fixture(scope="module")
def url(app) -> Iterator[str]:
    with live_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def alone(model, tokenizer, prompt: str, max_tokens: int, **kw) -> str:
    ids = tokenizer.encode(prompt)
    return tokenizer.decode(generate(model, [ids], max_tokens, eos_id=EOS_ID, **kw)[0][len(ids):])


def test_completion_list_prompt_n_and_usage(client, model, tokenizer):
    r = client.completions.create(model="small", prompt=PROMPTS[0], max_tokens=15, temperature=0)
    assert r.choices[0].text == alone(model, tokenizer, PROMPTS[0], 15) and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(tokenizer.encode(PROMPTS[0])), 15)
    r = client.completions.create(model="small", prompt=PROMPTS, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == list(range(8))
    assert [c.text for c in r.choices] == [alone(model, tokenizer, p, 6) for p in PROMPTS for _ in range(2)]


def test_seed_stop_and_stream(client, model, tokenizer):
    kw = dict(model="small", prompt=PROMPTS[1], max_tokens=12, temperature=1.0, seed=42)
    a, b = (client.completions.create(**kw).choices[0].text for _ in range(2))
    assert a == b == alone(model, tokenizer, PROMPTS[1], 12, temperature=1.0, generator=42)
    assert client.completions.create(**{**kw, "seed": 43}).choices[0].text != a
    stop = a[3:6]
    r = client.completions.create(**kw, stop=stop)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (a[:a.index(stop)], "stop")
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == a and chunks[-1].choices[0].finish_reason == "length"


def test_chat(client, model, tokenizer):
    messages = [{"role": "user", "content": "Say hello."}]
    r = client.chat.completions.create(model="small", messages=messages, max_tokens=10, temperature=0)
    expected = alone(model, tokenizer, chat_prompt(messages), 10).lstrip()
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="small", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


@pytest.mark.parametrize("kw, error, words", [
    ({"temperature": -0.5}, "BadRequestError", "temperature"),
    ({"top_p": 0.0}, "BadRequestError", "top_p"),
    ({"extra_body": {"top_k": -3}}, "BadRequestError", "top_k"),
    ({"max_tokens": 1001}, "BadRequestError", "cap of 1000"),
    ({"n": 5}, "BadRequestError", "n must be"),
    ({"prompt": " ".join(["hi"] * 1100)}, "BadRequestError", "1100 tokens, 76 more than the model's context of 1024"),
    ({"model": "gpt-4"}, "NotFoundError", "does not exist"),
    ({"extra_body": {"seed": "x"}}, "UnprocessableEntityError", "seed must be an integer"),
    ({"prompt": "x" * 30_000}, "APIStatusError", "20000 bytes"),
])
def test_errors(client, kw, error, words):
    args = {"model": "small", "prompt": "hi", "max_tokens": 3, **kw}
    with pytest.raises(getattr(openai, error)) as e:
        client.completions.create(**args)
    assert words in e.value.message
    assert e.value.status_code in {"BadRequestError": (400,), "NotFoundError": (404,),
                                   "UnprocessableEntityError": (422,), "APIStatusError": (413,)}[error]
    assert client.models.list().data[0].id == "small"  # still serving


def test_busy_and_api_key(client, app, model, tokenizer):
    engine = app.state.service.engine
    engine.max_waiting, saved = 0, engine.max_waiting
    try:
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="small", prompt="hi", max_tokens=2)
        assert e.value.status_code == 503
    finally:
        engine.max_waiting = saved
    locked = create_app(model, tokenizer, "small", api_key="k3y")
    try:
        with live_server(locked) as url:
            bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
            assert httpx.get(url + "/v1/models").status_code == 401  # no key at all
            good = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0)
            assert good.completions.create(model="small", prompt="hi", max_tokens=2).usage.completion_tokens == 2
    finally:
        locked.state.service.close()


def test_clients_at_once_get_what_each_gets_alone(url, client, model, tokenizer):
    lengths = [30, 5, 17, 40, 9, 25]
    prompts = [PROMPTS[i % len(PROMPTS)] * (1 + i % 3) for i in range(len(lengths))]
    start = threading.Barrier(len(prompts))
    got: dict[int, str] = {}

    def ask(i: int) -> None:
        own = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        start.wait()
        stream = i % 2 == 1
        r = own.completions.create(model="small", prompt=prompts[i], max_tokens=lengths[i], temperature=0,
                                   stream=stream)
        got[i] = "".join(c.choices[0].text for c in r) if stream else r.choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [got.get(i) for i in range(len(prompts))] == \
        [alone(model, tokenizer, p, n) for p, n in zip(prompts, lengths, strict=True)]
    assert httpx.get(url + "/health").json()["peak_batch"] > 1


def test_a_client_that_hangs_up_frees_its_row(url):
    before = httpx.get(url + "/health").json()["tokens_generated"]
    body = {"model": "small", "prompt": "Once", "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    for _ in range(500):  # the server notices the closed connection within a step or so
        health = httpx.get(url + "/health").json()
        if health["running"] == 0:
            break
        time.sleep(0.02)
    assert health["running"] == 0 and health["waiting"] == 0
    assert health["tokens_generated"] - before < 1000
    before = health["tokens_generated"]
    with pytest.raises(httpx.ReadTimeout):  # not streamed: the client gives up waiting, and hangs up
        httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=0.5)
    for _ in range(500):
        health = httpx.get(url + "/health").json()
        if health["running"] == 0:
            break
        time.sleep(0.02)
    assert health["running"] == 0 and health["tokens_generated"] - before < 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_command(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "minigpt.serve", "--preset", "tiny", "--port", str(port), "--name", "t",
           "--max-tokens", "8", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()["model"] == "t":
                    break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read().decode()
                time.sleep(0.1)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        assert c.completions.create(model="t", prompt="Hi", max_tokens=8).usage.completion_tokens == 8
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="t", prompt="Hi", max_tokens=9)
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn shuts down gracefully, the command ends well
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0
