"""`qprompt serve`: a real uvicorn server on loopback, driven over HTTP.

Every answer is checked against ExportedModel run directly on the same graph: batching (requests
sharing forward passes, rows joining a running batch) must not change a single token.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from qprompt.deploy.runtime import DecodeBatch, ExportedModel, Sampling, log_softmax
from qprompt.deploy.serve import ServeOptions, bind, create_app
from tests.kit import cli, data_rows

REVIEWS = [r["text"] for r in data_rows("rotten_tomatoes", "test", 12)]


class Client:
    def __init__(self, port: int):
        self.port = port

    def request(self, method: str, path: str, body=None, raw: bytes | None = None) -> tuple[int, dict | str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        text = response.read().decode()
        conn.close()
        is_json = response.getheader("content-type", "").startswith("application/json")
        return response.status, json.loads(text) if is_json else text

    def post(self, path: str, body=None, raw: bytes | None = None):
        return self.request("POST", path, body, raw)


def start_server(model: ExportedModel, options: ServeOptions):
    import uvicorn

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(model, options), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    return server, thread, Client(sock.getsockname()[1])


@pytest.fixture(scope="module")
def model(sentiment_export) -> ExportedModel:
    return ExportedModel(sentiment_export, providers=["CPUExecutionProvider"], threads=1)


@pytest.fixture(scope="module")
def client(model):
    # A long batch window, so that requests sent together surely share their first forward pass.
    server, thread, client = start_server(model, ServeOptions(max_batch=8, batch_window_ms=100))
    yield client
    server.should_exit = True
    thread.join(timeout=10)


def alone(model: ExportedModel, text: str, max_tokens: int) -> str:
    return model.generate([text], Sampling(max_new_tokens=max_tokens))[0]


def test_completion_is_the_runtime_greedy_output(client, model):
    status, body = client.post("/v1/completions", {"prompt": REVIEWS[0], "max_tokens": 6})
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["text"].strip() == alone(model, REVIEWS[0], 6)
    assert body["usage"]["prompt_tokens"] == len(model.prompt_ids(REVIEWS[0]))
    assert choice["finish_reason"] in ("length", "stop")
    assert (body["usage"]["completion_tokens"] == 6) == (choice["finish_reason"] == "length")


def test_concurrent_requests_share_forward_passes_and_keep_their_tokens(client, model):
    before = client.request("GET", "/metrics")[1]
    jobs = [(text, 3 + i % 5) for i, text in enumerate(REVIEWS[:8])]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda j: client.post("/v1/completions", {"prompt": j[0], "max_tokens": j[1]}), jobs))
    for (text, n), (status, body) in zip(jobs, answers):
        assert status == 200, body
        assert body["choices"][0]["text"].strip() == alone(model, text, n)
    after = client.request("GET", "/metrics")[1]
    assert after["largest_pass_rows"] > 1  # batched, not served one at a time
    passes = after["forward_passes"] - before["forward_passes"]
    assert passes < sum(n for _, n in jobs)  # one at a time would need a pass per generated token at least
    assert after["requests"]["completions"] - before["requests"].get("completions", 0) == 8


def test_rows_joining_a_running_batch_get_the_tokens_they_get_alone(model):
    prompts = [model.prompt_ids(text) for text in REVIEWS[:3]]
    expected = [model.generate_ids([p], Sampling(max_new_tokens=6))[0] for p in prompts]
    batch, got = DecodeBatch(model), [[], [], []]
    rows = [0]
    logits = batch.join([prompts[0]])
    for step in range(12):
        if step == 2:  # two more requests arrive while the first is decoding
            logits = np.concatenate([logits, batch.join(prompts[1:])])
            rows += [1, 2]
        nxt = logits.argmax(-1)
        for r, tok in zip(rows, nxt):
            got[r].append(int(tok))
        going = [k for k, r in enumerate(rows) if len(got[r]) < 6]
        if not going:
            break
        if len(going) < len(rows):
            batch.keep(going)
            rows, nxt = [rows[k] for k in going], nxt[going]
        logits = batch.step(nxt)
    eos = model.eos_ids
    assert [g[: next((i for i, t in enumerate(g) if t in eos), 6)] for g in got] == expected


def test_stream_sends_the_same_text_as_server_sent_events(client, model):
    status, text = client.post("/v1/completions", {"prompt": REVIEWS[1], "max_tokens": 5, "stream": True})
    assert status == 200
    events = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks).strip() == alone(model, REVIEWS[1], 5)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_stop_strings_and_a_list_of_prompts(client, model):
    full = alone(model, REVIEWS[2], 8)
    stop = full.split()[1] if len(full.split()) > 1 else full[-1]
    status, body = client.post("/v1/completions", {"prompt": [REVIEWS[2], REVIEWS[3]], "max_tokens": 8,
                                                   "stop": stop})
    assert status == 200, body
    first, second = body["choices"]
    assert first["text"].strip() == full[: full.index(stop)].strip() and first["finish_reason"] == "stop"
    assert second["index"] == 1 and second["text"].strip() == alone(model, REVIEWS[3], 8).split(stop)[0].strip()


def test_sampling_with_a_seed_repeats_and_top_p_zero_is_greedy(client, model):
    body = {"prompt": REVIEWS[4], "max_tokens": 6, "temperature": 1.5, "seed": 7}
    first, again = client.post("/v1/completions", body)[1], client.post("/v1/completions", body)[1]
    assert first["choices"][0]["text"] == again["choices"][0]["text"]
    status, greedy = client.post("/v1/completions", {**body, "top_p": 0})
    assert greedy["choices"][0]["text"].strip() == alone(model, REVIEWS[4], 6)


def test_classify_returns_labels_with_their_probabilities(client, model):
    rows = [{"text": t} for t in REVIEWS[:6]]
    status, body = client.post("/v1/classify", {"input": rows})
    assert status == 200, body
    assert [d["label"] for d in body["data"]] == model.classify(rows)
    scores = model.label_scores([model.prompt_ids(r) for r in rows])
    expected = np.exp(log_softmax(scores))
    got = np.array([[d["probabilities"][lab] for lab in model.label_ids()] for d in body["data"]])
    # The same rows in one batch; 1e-5 leaves room for float32 logits summed in another order (~1e-6 relative).
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    status, one = client.post("/v1/classify", {"input": REVIEWS[0]})  # a plain string, one-field template
    assert status == 200 and one["data"][0]["label"] == model.classify([REVIEWS[0]])[0]


@pytest.mark.parametrize(("path", "body", "status", "message"), [
    ("/v1/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, "must be a JSON object"),
    ("/v1/completions", {"max_tokens": 4}, 400, "no 'prompt'"),
    ("/v1/completions", {"prompt": "a film", "max_tokens": 10**9}, 400, "'max_tokens' must be between 1 and 1024"),
    ("/v1/completions", {"prompt": "a film", "max_tokens": "ten"}, 400, "'max_tokens' must be an integer"),
    ("/v1/completions", {"prompt": "a film", "temperature": "hot"}, 400, "'temperature' must be a number"),
    ("/v1/completions", {"prompt": "a film", "top_p": 2}, 400, "'top_p' must be between 0 and 1"),
    ("/v1/completions", {"prompt": 5}, 400, "must be a string or an object"),
    ("/v1/completions", {"prompt": "  "}, 400, "empty"),
    ("/v1/completions", {"prompt": []}, 400, "empty list"),
    ("/v1/completions", {"prompt": "a film", "stream": "yes"}, 400, "'stream' must be true or false"),
    ("/v1/completions", {"prompt": "a film", "stop": [1]}, 400, "'stop' must be"),
    ("/v1/completions", {"prompt": {"review": "a film"}}, 400, "lacks field 'text'"),
    ("/v1/completions", {"prompt": "great " * 400}, 400, "this export takes at most"),
    ("/v1/completions", {"prompt": "a film", "max_tokens": 250}, 400, "ask for at most"),
    ("/v1/completions", {"prompt": "a film", "n": 3}, 400, "'n' is not supported"),
    ("/v1/completions", {"prompt": "a film", "top_k": -1}, 400, "'top_k' must be between"),
    ("/v1/completions", b'{"prompt": "' + b"a" * (1 << 20) + b'"}', 413, "larger than 1 MiB"),
    ("/v1/classify", {"text": "a film"}, 400, "no 'input'"),
    ("/v1/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nests too deeply"),
    ("/v1/classify", b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nests too deeply"),
    ("/v1/classify", {"input": "great " * 400}, 400, "this export takes at most"),
])
def test_bad_requests_get_a_4xx_naming_the_problem(client, path, body, status, message):
    raw = body if isinstance(body, bytes) else None
    got, answer = client.post(path, None if raw else body, raw)
    assert got == status and message in answer["error"]["message"], answer
    assert client.request("GET", "/health")[1]["status"] == "ok"  # still serving


def test_health_and_metrics_describe_the_server(client, model):
    status, health = client.request("GET", "/health")
    assert status == 200 and health["tasks"] == [{"name": "artifact", "kind": "classification",
                                                  "labels": ["positive", "negative"], "fields": ["text"]}]
    before = client.request("GET", "/metrics")[1]
    client.post("/v1/completions", {"prompt": "a film", "max_tokens": 0})
    answer = client.post("/v1/completions", {"prompt": REVIEWS[5], "max_tokens": 3})[1]
    after = client.request("GET", "/metrics")[1]
    assert after["errors"]["400"] == before["errors"].get("400", 0) + 1
    assert after["requests"]["completions"] == before["requests"].get("completions", 0) + 2
    assert after["generated_tokens"] - before["generated_tokens"] == answer["usage"]["completion_tokens"]
    assert after["prompt_tokens"] - before["prompt_tokens"] == answer["usage"]["prompt_tokens"]
    assert after["latency_s"]["of_last"] == before["latency_s"]["of_last"] + 1  # answered requests only
    assert after["queued_rows"] == 0 and after["active_rows"] == 0


def test_one_at_a_time_serving_gives_the_same_answers(model):
    server, thread, client = start_server(model, ServeOptions(max_batch=1, batch_window_ms=0))
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda t: client.post("/v1/completions", {"prompt": t, "max_tokens": 4}),
                                    REVIEWS[:4]))
        assert [a[1]["choices"][0]["text"].strip() for a in answers] == [alone(model, t, 4) for t in REVIEWS[:4]]
        assert client.request("GET", "/metrics")[1]["largest_pass_rows"] == 1
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_start_up_errors_are_one_line(sentiment_export, tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        result = cli("serve", sentiment_export, "--port", port)
    finally:
        taken.close()
    assert result.exit_code == 2 and result.output.startswith(f"error: port {port} on 127.0.0.1 is in use")
    assert "pass another --port" in result.output and "Traceback" not in result.output
    result = cli("serve", tmp_path / "nowhere", "--port", 0)
    assert result.exit_code == 2 and "error:" in result.output and "does not exist" in result.output
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in sentiment_export.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.onnx").write_bytes(b"not a graph")
    result = cli("serve", broken, "--port", 0)
    assert result.exit_code == 2 and "could not be loaded by onnxruntime" in result.output
    assert len(result.output.strip().splitlines()) == 1
