"""`mythos serve`: the OpenAI-compatible endpoint, a real server on an ephemeral port and a real HTTP client.

Every completion is checked against an independent computation: the torch twin's `model.generate` on the
same prompt ids (greedy and seeded sampling), decoded by the byte tokenizer.
"""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

import mythos_torch
from helpers import tiny
from mythos.cli import app
from mythos.serve.http import TextAssembler, start_server
from mythos.tokenizer import ByteTokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]
TOK = ByteTokenizer()
MAX_WAITING = 6


@pytest.fixture(scope="module")
def model():
    return mythos_torch.build(tiny(vocab_size=258), seed=0, dtype="float64")


@pytest.fixture(scope="module")
def server(model):
    srv = start_server(model, model_name="tiny", max_num_seqs=4, block_size=4, max_waiting=MAX_WAITING,
                       max_body_bytes=4096, socket_timeout=10)
    yield srv
    srv.close()


def request(srv, method, path, body=None, headers=None, raw=None):
    """(status, headers, body bytes) of one request on a fresh connection."""
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    out = r.status, dict(r.getheaders()), r.read()
    conn.close()
    return out


def complete(srv, body):
    """(status, JSON) of POST /v1/completions."""
    status, _, data = request(srv, "POST", "/v1/completions", body)
    return status, json.loads(data)


def sse(data: bytes) -> list:
    """The JSON chunks of a server-sent-events body, checking it ends with data: [DONE]."""
    events = [e for e in data.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def solo(model, ids, max_tokens, temperature=0.0, seed=0, top_k=None, top_p=None, n_loops=None, stop=None):
    """The new tokens of model.generate on one prompt, cut after EOS or the first stop."""
    out = model.generate(torch.tensor([ids]), max_tokens, n_loops, temperature, top_k, top_p, seed, TOK.eos_id,
                         stop=stop)
    new = out[0, len(ids):].tolist()
    return new[:new.index(TOK.eos_id) + 1] if TOK.eos_id in new else new


def test_completion_equals_generate_and_engine(server, model):
    status, r = complete(server, {"model": "tiny", "prompt": "hello", "max_tokens": 12, "temperature": 0})
    assert status == 200, r
    want = solo(model, TOK.encode("hello"), 12)
    assert len(want) == 12  # no EOS within: finish_reason is length
    assert r["object"] == "text_completion" and r["model"] == "tiny" and r["id"].startswith("cmpl-")
    assert r["choices"] == [{"text": TOK.decode(want), "index": 0, "logprobs": None, "finish_reason": "length"}]
    assert r["usage"] == {"prompt_tokens": 6, "completion_tokens": 12, "total_tokens": 18}
    from mythos.serve import Engine, SamplingParams

    engine_tokens = Engine(model, max_num_seqs=2, block_size=4).run(
        [TOK.encode("hello")], SamplingParams(max_tokens=12, eos_id=TOK.eos_id))[0]
    assert r["choices"][0]["text"] == TOK.decode(engine_tokens)

    # OpenAI's options at their neutral values are accepted (clients send them)
    neutral = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "suffix": None, "presence_penalty": 0.0,
               "frequency_penalty": 0, "logit_bias": {}, "user": "me", "top_p": 1, "top_k": -1, "stream": False}
    status, r2 = complete(server, {"prompt": "hello", "max_tokens": 12, "temperature": 0, **neutral})
    assert status == 200 and r2["choices"][0]["text"] == r["choices"][0]["text"], r2

    # sampling, a loop budget and token-id prompts: the same seed gives generate's tokens
    body = {"prompt": [TOK.bos_id, 5, 200, 17], "max_tokens": 9, "temperature": 0.9, "top_k": 40, "top_p": 0.95,
            "seed": 7, "n_loops": 2}
    status, r = complete(server, body)
    assert status == 200, r
    want = solo(model, [TOK.bos_id, 5, 200, 17], 9, 0.9, 7, 40, 0.95, 2)
    assert r["choices"][0]["text"] == TOK.decode(want)
    assert r["usage"]["completion_tokens"] == len(want)


def test_stream_concatenates_to_the_text(server, model):
    body = {"prompt": "héllo wörld", "max_tokens": 20, "temperature": 0.7, "seed": 3}
    status, r = complete(server, body)
    assert status == 200, r
    status, headers, data = request(server, "POST", "/v1/completions",
                                    {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    chunks = sse(data)
    *texts, usage = chunks
    assert "".join(c["choices"][0]["text"] for c in texts) == r["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in texts][-1] == r["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in texts[:-1])
    assert usage["choices"] == [] and usage["usage"] == r["usage"]


def _prompt_with_ascii(model, n=10):
    """A prompt whose greedy continuation holds a printable ASCII byte after its first token (random
    weights emit arbitrary bytes; stop strings are text), with that continuation and the byte's place."""
    for k in range(40):
        prompt = f"p{k}"
        new = solo(model, TOK.encode(prompt), n)
        where = [i for i, t in enumerate(new) if i >= 1 and 32 <= t < 127 and TOK.eos_id not in new[:i]]
        if where:
            return prompt, new, where[0]
    raise AssertionError("no prompt among 40 has a printable byte in its continuation")


def test_stop_strings_end_the_completion_and_are_left_out(server, model):
    prompt, new, i = _prompt_with_ascii(model)
    stop = chr(new[i])
    first = new.index(new[i])  # the first place the byte appears
    body = {"prompt": prompt, "max_tokens": 10, "temperature": 0, "stop": [stop, "\x00never"]}
    status, r = complete(server, body)
    assert status == 200, r
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["text"] == TOK.decode(new[:first])  # the stop string is not in the text
    assert r["usage"]["completion_tokens"] == first + 1  # the engine generated it
    out = model.generate(torch.tensor([TOK.encode(prompt)]), 10, stop=[[new[i]]], eos_id=TOK.eos_id)[0, -10:]
    assert out.tolist() == new[:first + 1] + [TOK.eos_id] * (9 - first)  # generate stops there too
    status, _, data = request(server, "POST", "/v1/completions", {**body, "stream": True})
    chunks = sse(data)
    assert "".join(c["choices"][0]["text"] for c in chunks) == r["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_list_of_prompts_gives_one_choice_each(server, model):
    prompts = ["a", "longer prompt", "ü"]
    status, r = complete(server, {"prompt": prompts, "max_tokens": 5, "temperature": 0})
    assert status == 200, r
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    for p, c in zip(prompts, r["choices"]):
        assert c["text"] == TOK.decode(solo(model, TOK.encode(p), 5))
    status, _, data = request(server, "POST", "/v1/completions", {"prompt": prompts, "max_tokens": 5,
                                                                  "temperature": 0, "stream": True})
    chunks = sse(data)
    for j, c in enumerate(r["choices"]):
        assert "".join(x["choices"][0]["text"] for x in chunks if x["choices"][0]["index"] == j) == c["text"]


def test_concurrent_requests_each_get_their_solo_result(server, model):
    bodies = [{"prompt": f"request {j}" * (j % 3 + 1), "max_tokens": 4 + 3 * j, "temperature": 0.5 * (j % 2),
               "seed": j, "n_loops": 1 + j % 4, "stream": j % 2 == 0} for j in range(6)]
    results = [None] * len(bodies)

    def go(j):
        results[j] = request(server, "POST", "/v1/completions", bodies[j])

    threads = [threading.Thread(target=go, args=(j,)) for j in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for b, (status, _, data) in zip(bodies, results):
        assert status == 200, data
        text = ("".join(c["choices"][0]["text"] for c in sse(data)) if b["stream"]
                else json.loads(data)["choices"][0]["text"])
        want = solo(model, TOK.encode(b["prompt"]), b["max_tokens"], b["temperature"], b["seed"], n_loops=b["n_loops"])
        assert text == TOK.decode(want), b


def test_models_and_health(server):
    status, _, data = request(server, "GET", "/v1/models")
    assert status == 200 and json.loads(data)["data"][0]["id"] == "tiny"
    assert json.loads(data)["data"][0]["max_model_len"] == 64
    status, _, data = request(server, "GET", "/v1/models/tiny")
    assert status == 200 and json.loads(data)["id"] == "tiny"
    status, _, data = request(server, "GET", "/health")
    assert status == 200 and json.loads(data)["status"] == "ok"


BAD_BODIES = [  # (body, status, the field the error names, words the message holds)
    ({"prompt": "x", "model": "gpt-4"}, 404, "model", "does not exist"),
    ({"prompt": "x", "n": 2}, 400, "n", "allowed"),
    ({"prompt": "x", "logprobs": 1}, 400, "logprobs", "not supported"),
    ({"prompt": "x", "echo": True}, 400, "echo", "not supported"),
    ({"prompt": "x", "best_of": 3}, 400, "best_of", "not supported"),
    ({"prompt": "x", "frequency_penalty": 0.5}, 400, "frequency_penalty", "not supported"),
    ({"prompt": "x", "echo": 0}, 400, "echo", "not supported"),
    ({"prompt": "\ud800"}, 400, "prompt", "not valid Unicode"),
    ({"prompt": "x", "stop": ["\udfff"]}, 400, "stop", "stop[0] is not valid Unicode"),
    ({"prompt": "x", "temperatur": 0}, 400, "temperatur", "unknown field"),
    ({"max_tokens": 3}, 400, "prompt", "required"),
    ({"prompt": 5}, 400, "prompt", "must be"),
    ({"prompt": []}, 400, "prompt", "empty"),
    ({"prompt": ["a", 1]}, 400, "prompt", "mixed"),
    ({"prompt": [1, 300]}, 400, "prompt", "vocab_size=258"),
    ({"prompt": ["a"] * (MAX_WAITING + 1)}, 400, "prompt", f"at most {MAX_WAITING}"),
    ({"prompt": "x" * 70}, 400, "prompt", "max_seq_len=64"),
    ({"prompt": "hello", "max_tokens": 60}, 400, "max_tokens", "max_seq_len=64"),
    ({"prompt": "x", "max_tokens": 1.5}, 400, "max_tokens", "integer"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature", "finite number"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature", ">= 0"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ({"prompt": "x", "top_k": 0}, 400, "top_k", "[1, vocab_size=258]"),
    ({"prompt": "x", "seed": -1}, 400, "seed", "[0, 2**63)"),
    ({"prompt": "x", "seed": True}, 400, "seed", "integer"),
    ({"prompt": "x", "n_loops": 0}, 400, "n_loops", "n_loops=0"),
    ({"prompt": "x", "n_loops": 5}, 400, "n_loops", "[1, 4]"),
    ({"prompt": "x", "stop": 3}, 400, "stop", "string"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"prompt": "x", "stop": [""]}, 400, "stop", "1 to 64 bytes"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream", "true or false"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", "stream: true"),
    ([1, 2], 400, None, "JSON object"),
]


@pytest.mark.parametrize("body,status,param,words", BAD_BODIES, ids=[str(b[2]) + "-" + b[3] for b in BAD_BODIES])
def test_bad_requests_get_a_json_error_naming_the_field(server, body, status, param, words):
    got, headers, data = request(server, "POST", "/v1/completions", body)
    assert got == status, data
    assert headers["Content-Type"] == "application/json"
    err = json.loads(data)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and words in err["message"], err
    assert err["type"] == "invalid_request_error"


RAW = [  # (method, path, raw body, extra headers, status, words)
    ("POST", "/v1/completions", b"{not json", {}, 400, "not valid JSON"),
    ("POST", "/v1/completions", b"\xff\xfe", {}, 400, "not valid JSON"),
    ("POST", "/v1/completions", b"", {}, 400, "empty"),
    ("POST", "/v1/completions", b'{"prompt": "' + b"x" * 5000 + b'"}', {}, 413, "at most 4,096"),
    ("POST", "/v1/chat/completions", b"{}", {}, 404, "chat is not served"),
    ("GET", "/nowhere", None, {}, 404, "no route"),
    ("GET", "/v1/models/gpt-4", None, {}, 404, "does not exist"),
    ("GET", "/v1/completions", None, {}, 405, "allowed: POST"),
    ("POST", "/health", b"{}", {}, 405, "allowed: GET"),
    ("DELETE", "/v1/models", None, {}, 405, "allowed: GET"),
]


@pytest.mark.parametrize("method,path,raw,headers,status,words", RAW, ids=[f"{r[0]}{r[1]}-{r[4]}" for r in RAW])
def test_bad_http_gets_a_json_error(server, method, path, raw, headers, status, words):
    got, hdrs, data = request(server, method, path, raw=raw, headers=headers)
    assert got == status, data
    err = json.loads(data)["error"]
    assert words in err["message"], err
    if status == 405:
        assert hdrs["Allow"] in ("POST", "GET")


def test_malformed_http_is_refused_without_a_hang(server):
    """A garbage request line, a chunked body, a body shorter than its Content-Length: JSON errors or a
    closed connection within the socket timeout, never a traceback or a hung thread."""
    host, port = server.server_address[:2]
    for raw, status in ((b"GARBAGE\r\n\r\n", 400), (b"BREW /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n", 501),
                        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"2\r\n{}\r\n0\r\n\r\n", 411)):
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(raw)
            data = b""
            while chunk := s.recv(65536):  # the server closes the connection after a refusal like these
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.split()[1] == str(status).encode(), data
        assert "error" in json.loads(body), data


def _blocks_in_use(srv):
    return srv.loop.stats()["blocks_used"]


def _wait(cond, timeout=20.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.02)


def test_a_dropped_stream_is_cancelled_and_frees_its_blocks(server, monkeypatch):
    cancelled = []
    cancel = server.loop.cancel
    monkeypatch.setattr(server.loop, "cancel", lambda rid: (cancelled.append(rid), cancel(rid)))
    step = server.loop.engine.step
    # a slow engine (20 ms a step): the 60-token requests are surely still running when the client leaves
    monkeypatch.setattr(server.loop.engine, "step", lambda: (time.sleep(0.02), step())[1])
    host, port = server.server_address[:2]
    # MAX_WAITING prompts in one streaming request: every slot is taken while it runs
    body = json.dumps({"prompt": ["a", "b", "c", "d", "e", "f"][:MAX_WAITING], "max_tokens": 60, "n_loops": 4,
                       "temperature": 0, "stream": True}).encode()
    s = socket.create_connection((host, port), timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
              + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while b"data: " not in got:  # the first chunk has come: the requests are running
        got += s.recv(4096)
    status, r = complete(server, {"prompt": "x", "max_tokens": 2})  # no slot left
    assert status == 429 and r["error"]["type"] == "rate_limit_error", r
    n_cancelled = server.loop.stats()["cancelled"]
    s.close()
    _wait(lambda: server.waiting == 0)
    assert len(cancelled) == MAX_WAITING  # every request of the dropped stream, none finished
    _wait(lambda: _blocks_in_use(server) == 0 and server.loop.stats()["running"] == 0)
    assert server.loop.stats()["cancelled"] == n_cancelled + MAX_WAITING
    # a client that leaves while waiting for a whole (not streamed) completion cancels it too
    body = json.dumps({"prompt": "a", "max_tokens": 60, "temperature": 0}).encode()
    s = socket.create_connection((host, port), timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode()
              + b"\r\n\r\n" + body)
    _wait(lambda: server.waiting == 1, timeout=5)
    s.close()
    _wait(lambda: server.waiting == 0)
    assert len(cancelled) == MAX_WAITING + 1
    _wait(lambda: _blocks_in_use(server) == 0 and server.loop.stats()["running"] == 0)
    status, r = complete(server, {"prompt": "x", "max_tokens": 2, "temperature": 0})  # the server serves on
    assert status == 200, r


@given(st.lists(st.sampled_from([104, 105, 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xFF, 257]), max_size=12),
       st.lists(st.sampled_from(["h", "hi", "é", "€", "ih"]), max_size=3))
def test_text_assembler_holds_back_stop_prefixes_and_split_characters(tokens, stops):
    """Deltas concatenate to the decoded tokens up to the first stop, less that stop (computed here
    independently); a delta never ends inside a character that a later byte completes."""
    stop = [tuple(x.encode()) for x in stops]
    reason, end, cut = "length", len(tokens), 0
    for i in range(len(tokens)):  # where the engine stops: the first token that completes a stop sequence
        hits = [len(x) for x in stop if len(x) <= i + 1 and tuple(tokens[i + 1 - len(x):i + 1]) == x]
        if hits:
            reason, end, cut = "stop", i + 1, max(hits)
            break
    asm = TextAssembler(TOK, stop)
    deltas = [asm.add(t) for t in tokens[:end]]
    deltas.append(asm.finish(reason))
    assert "".join(deltas) == TOK.decode(tokens[:end - cut])
    assert asm.n_tokens == end
    if not any(0x80 <= t < 0x100 for t in tokens):
        assert "\ufffd" not in "".join(deltas)


def test_text_assembler_streams_multibyte_characters_whole():
    asm = TextAssembler(TOK, [])
    ids = list("aé€".encode())
    assert [asm.add(t) for t in ids] == ["a", "", "é", "", "", "€"]
    assert asm.finish("length") == ""
    asm = TextAssembler(TOK, [tuple(b"lo")])
    assert [asm.add(t) for t in b"hello"] == ["h", "e", "", "l", ""] and asm.finish("stop") == ""  # "l" waits for "o"
    asm = TextAssembler(TOK, [])
    assert asm.add(0xC3) == "" and asm.finish("length") == "\ufffd"  # as tokenizer.decode gives


def test_serve_command_answers_and_stops_on_sigint():
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "mythos", "serve", "--port", "0", "--max-num-seqs", "2"], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not any(line.startswith("curl ") for line in lines):
            line = p.stdout.readline()
            assert line, f"serve ended early: {p.stderr.read()}"
            lines.append(line)
        url = next(line.split(" at ")[1].split()[0] for line in lines if line.startswith("serving "))
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        with urllib.request.urlopen(url[:-3] + "/health", timeout=30) as r:
            assert json.load(r)["status"] == "ok"
        body = json.dumps({"prompt": "hi", "max_tokens": 4, "temperature": 0}).encode()
        req = urllib.request.Request(url + "/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            out = json.load(r)
        want = solo(mythos_torch.build(tiny(vocab_size=258), seed=0, dtype="float32"), TOK.encode("hi"), 4)
        assert out["choices"][0]["text"] == TOK.decode(want) and out["model"] == "tiny"
        p.send_signal(signal.SIGINT)
        assert p.wait(30) == 0, p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_serve_command_refuses_a_port_in_use():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = CliRunner().invoke(app, ["serve", "--port", str(port)])
    assert r.exit_code == 2, r.output
    assert f"--port {port}" in r.output and "already in use" in r.output
    r = CliRunner().invoke(app, ["serve", "tiny", "--port", "0"])  # vocab_size 64: no byte tokenizer
    assert r.exit_code == 2 and "vocab_size=64 is too small" in r.output


def test_serve_command_serves_a_weights_file(tmp_path, monkeypatch):
    """`mythos serve FILE` in this process: serve_forever is replaced by one that answers one completion
    from a thread and returns, so the command then closes the server and the engine loop (exit 0)."""
    import weights_bridge as wb
    from mythos.serve import http as H

    m = mythos_torch.build(tiny(vocab_size=258, max_seq_len=96), seed=5, dtype="float32")
    path = wb.save(m, tmp_path / "five.safetensors")
    got = {}
    serve_forever = H.CompletionServer.serve_forever

    def answer_once(self, poll_interval=0.5):
        t = threading.Thread(target=serve_forever, args=(self, 0.05))
        t.start()
        got["status"], got["body"] = complete(self, {"model": "five", "prompt": "hi", "max_tokens": 70,
                                                     "temperature": 0})
        self.shutdown()
        t.join()

    monkeypatch.setattr(H.CompletionServer, "serve_forever", answer_once)
    r = CliRunner().invoke(app, ["serve", str(path), "--port", "0", "--max-num-seqs", "2"])
    assert r.exit_code == 0, r.output
    assert "serving five at http://127.0.0.1:" in r.output and "curl http://127.0.0.1:" in r.output
    assert got["status"] == 200, got
    assert got["body"]["choices"][0]["text"] == TOK.decode(solo(m, TOK.encode("hi"), 70))


@pytest.mark.parametrize("args, message", [
    (["--max-tokens-limit", "100"], "--max-tokens-limit=100 must be an integer in [1, 64]"),
    (["--max-loops", "300"], "--max-loops=300 must be an integer in [1, 256]"),
    (["--backend", "mxnet"], "--backend 'mxnet' is not allowed"),
    (["--set", "vocab_size=64"], "vocab_size=64 is too small"),
    (["--host", "192.0.2.1"], "--host '192.0.2.1' is not an address"),  # TEST-NET: on no machine
])
def test_serve_command_bad_input_exits_2(args, message):
    r = CliRunner().invoke(app, ["serve", "--port", "0", *args])
    assert r.exit_code == 2 and message in r.output, r.output
