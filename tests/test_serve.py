"""`hf-gpt serve`: a real server process on 127.0.0.1, queried with the `openai` client. Greedy completions give
the tokens `generate()` gives (one by one and in a concurrent burst, through continuous batching), each bad request
gets a 4xx with a message while the server keeps answering, and SIGTERM stops it cleanly."""

from __future__ import annotations

import atexit
import http.client
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import early, early_prepared, early_result

from hf_gpt import GPTConfig, GPTForCausalLM, gpt2_tokenizer

# A skip mark rather than a module-level importorskip: the tests are still collected (and reported as skipped).
pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("openai", "fastapi", "uvicorn")),
    reason="pip install -e '.[serve]'",
)

N_POSITIONS = 64
PROMPTS = ["Hello there", "The quick brown fox", "Once upon a time, in a land", "1 2 3"]
BURST = [f"Request number {i} says" + " word" * i for i in range(12)]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
START_TIMEOUT_S, STOP_TIMEOUT_S, REQUEST_TIMEOUT_S = 90, 20, 60


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@early("server")
def start_server(work: Path):
    """Prepared: a small model folder (GPT-2 tokenizer beside it). Run in the background (conftest's `early`):
    `hf-gpt serve` on it, up to its first healthy answer. Returns (process, port, log file)."""
    folder = work / "tiny-gpt"
    torch.manual_seed(0)
    # initializer_range 0.3: greedy continuations that vary (at 0.02 a random model repeats one token).
    config = GPTConfig(n_positions=N_POSITIONS, n_embd=64, n_layer=2, n_head=2, initializer_range=0.3)
    model = GPTForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer = gpt2_tokenizer(model_max_length=N_POSITIONS)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)

    def run() -> tuple[subprocess.Popen, int, object]:
        port = free_port()
        log = open(work / "server.log", "w+")  # noqa: SIM115 (closed by the fixture)
        cmd = [sys.executable, "-m", "hf_gpt.cli", "serve", str(folder), "--port", str(port), "--log-level", "warning"]
        env = {**os.environ, "NO_PROXY": "127.0.0.1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        atexit.register(stop, proc)  # should the session end before this module's tests run
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                assert proc.poll() is None, f"server exited with {proc.returncode}:\n{_tail(log)}"
                assert time.monotonic() < deadline, f"server not up after {START_TIMEOUT_S} s:\n{_tail(log)}"
                try:
                    status, _ = request(port, "GET", "/health")
                    if status == 200:
                        return proc, port, log
                except OSError:
                    pass
                time.sleep(0.25)
        except BaseException:
            stop(proc)
            log.close()
            raise

    return (model, tokenizer, folder), run


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


@pytest.fixture(scope="module")
def server():
    return early_result("server")


@pytest.fixture(scope="module")
def served(server):
    """The model, its tokenizer and folder, the `hf-gpt serve` process and an openai client on it."""
    import openai

    model, tokenizer, folder = early_prepared("server")
    proc, port, log = server
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1",
            api_key="unused",
            max_retries=0,
            timeout=REQUEST_TIMEOUT_S,
            http_client=openai.DefaultHttpxClient(trust_env=False),
        )
        yield {"client": client, "model": model, "tok": tokenizer, "name": str(folder), "port": port, "proc": proc}
    finally:
        stop(proc)
        log.close()


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-3000:]


def request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    """One HTTP request to 127.0.0.1 (for what the openai client cannot send, such as a body that is not JSON)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def greedy_ids(served, prompt: str | list[int], n: int) -> list[int]:
    ids = served["tok"](prompt)["input_ids"] if isinstance(prompt, str) else prompt
    with torch.no_grad():
        out = served["model"].generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


def complete(served, prompt, n: int, **kw):
    return served["client"].completions.create(
        model=served["name"], prompt=prompt, max_tokens=n, temperature=0, extra_body={"return_token_ids": True}, **kw
    )


@pytest.mark.slow  # the server process
def test_greedy_completions_equal_generate(served):
    for prompt in PROMPTS:
        want = greedy_ids(served, prompt, 12)
        assert len(set(want)) > 2  # a continuation that varies, so that a wrong one shows
        answer = complete(served, prompt, 12)
        choice = answer.choices[0]
        assert choice.model_extra["token_ids"] == want, prompt
        assert choice.text == served["tok"].decode(want, skip_special_tokens=True)
        assert answer.model_extra["prompt_token_ids"] == served["tok"](prompt)["input_ids"]
        assert answer.usage.completion_tokens == len(want)
    # The plain OpenAI answer (no extension), a prompt given as token ids, and streaming give the same text.
    want = greedy_ids(served, PROMPTS[1], 12)
    text = served["tok"].decode(want, skip_special_tokens=True)
    plain = served["client"].completions.create(model=served["name"], prompt=PROMPTS[1], max_tokens=12, temperature=0)
    assert plain.choices[0].text == text and plain.choices[0].finish_reason == "length"
    ids = served["tok"](PROMPTS[1])["input_ids"]
    assert complete(served, ids, 12).choices[0].model_extra["token_ids"] == want
    stream = served["client"].completions.create(
        model=served["name"], prompt=PROMPTS[1], max_tokens=12, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == text
    # Without max_tokens the answer fills the context, as in vLLM.
    fill = served["client"].completions.create(model=served["name"], prompt=" ".join(["sea"] * 50), temperature=0)
    assert fill.usage.prompt_tokens == 50 and fill.usage.total_tokens == N_POSITIONS
    assert [m.id for m in served["client"].models.list().data] == [served["name"]]


@pytest.mark.slow  # the server process
def test_concurrent_burst_all_answered_correctly(served):
    """12 requests at once go through continuous batching together; each gets its own generate() tokens."""
    want = [greedy_ids(served, prompt, 8) for prompt in BURST]
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(BURST)) as pool:
        answers = list(pool.map(lambda prompt: complete(served, prompt, 8), BURST))
    assert time.monotonic() - start < REQUEST_TIMEOUT_S
    assert [a.choices[0].model_extra["token_ids"] for a in answers] == want


@pytest.mark.slow  # the server process
def test_chat_completions_equal_generate(served):
    """Chat renders the messages with the tokenizer's chat template, then decodes as a completion does."""
    messages = [{"role": "user", "content": "Tell me about the sea"}]
    ids = served["tok"].apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = ids["input_ids"]
    want = greedy_ids(served, ids, 10)
    answer = served["client"].chat.completions.create(
        model=served["name"], messages=messages, max_tokens=10, temperature=0
    )
    assert answer.choices[0].message.content == served["tok"].decode(want, skip_special_tokens=True)
    assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == len(want)
    # Without max_tokens (transformers would ask for 1024 new tokens): the room left in the context. A long prompt
    # keeps that short.
    long_messages = [{"role": "user", "content": " ".join(["sea"] * 48)}]
    fill = served["client"].chat.completions.create(model=served["name"], messages=long_messages, temperature=0)
    assert fill.usage.total_tokens <= N_POSITIONS
    response = served["client"].responses.create(
        model=served["name"], input=long_messages[0]["content"], temperature=0, stream=False
    )
    assert response.usage.total_tokens <= N_POSITIONS


def test_chat_needs_a_chat_template():
    from hf_gpt.serve import RequestError, check_chat

    with pytest.raises(RequestError, match="no chat template"):
        check_chat({}, gpt2_tokenizer(), N_POSITIONS, [{"role": "user", "content": "hi"}], None, "max_tokens")


LONG = " ".join(["word"] * (N_POSITIONS + 10))  # more tokens than the context holds


@pytest.mark.slow  # the server process
@pytest.mark.parametrize(
    "body, param, says",
    [
        ({"prompt": LONG, "max_tokens": 4}, "prompt", "context is 64 tokens"),
        ({"prompt": "Hello there", "max_tokens": N_POSITIONS}, "max_tokens", "ask for at most 62"),
        ({"prompt": "Hello there", "max_tokens": -3}, "max_tokens", "must be at least 1"),
        ({"prompt": "Hello there", "max_tokens": 0}, "max_tokens", "must be at least 1"),
        ({"prompt": "Hello there", "max_tokens": "4"}, "max_tokens", "must be an integer"),
        ({"prompt": [15496, 50257, 612], "max_tokens": 4}, "prompt", "outside this model's vocabulary"),
        ({"prompt": [15496, -1], "max_tokens": 4}, "prompt", "outside this model's vocabulary"),
        ({"prompt": "", "max_tokens": 4}, "prompt", "empty"),
        ({"prompt": ["a", "b"], "max_tokens": 4}, "prompt", "one string or one list of token ids"),
        ({"prompt": "Hello there", "max_tokens": 4, "temperature": 0.8}, "temperature", "decodes greedily"),
    ],
)
def test_bad_request_gets_4xx_and_the_server_goes_on(served, body, param, says):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        served["client"].completions.create(model=served["name"], **body)
    assert caught.value.status_code == 400
    assert says in caught.value.message
    assert caught.value.body["param"] == param
    assert complete(served, "Hello there", 4).choices[0].model_extra["token_ids"] == greedy_ids(
        served, "Hello there", 4
    )


@pytest.mark.slow  # the server process
@pytest.mark.parametrize(
    "path, body, says",
    [
        ("/v1/completions", b'{"prompt": "Hello", "max_tokens": ', "not a JSON object"),
        ("/v1/completions", b'["a list"]', "not a JSON object"),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": LONG}]}).encode(), "context"),
        ("/v1/responses", json.dumps({"input": "hi", "max_output_tokens": 99}).encode(), "at most"),
    ],
)
def test_malformed_body_and_long_chat_get_400(served, path, body, says):
    status, answer = request(served["port"], "POST", path, body)
    assert status == 400, answer
    assert says in answer["error"]["message"]
    assert complete(served, "Hello there", 4).choices[0].model_extra["token_ids"] == greedy_ids(
        served, "Hello there", 4
    )


@pytest.mark.slow  # the server process
def test_sigterm_stops_the_server_cleanly(served):
    """Last in this file: the server process exits by itself, with status 0, soon after SIGTERM."""
    proc = served["proc"]
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=STOP_TIMEOUT_S) == 0
