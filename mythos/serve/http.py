"""`mythos serve`: an OpenAI-compatible completions endpoint on the engine's EngineLoop, stdlib only.

    >>> from mythos.serve.http import start_server
    >>> server = start_server(model, port=0)          # binds, starts the engine loop and a serving thread
    >>> server.url                                    # 'http://127.0.0.1:54321'
    >>> server.close()                                # stops serving, then the engine loop

Routes: ``POST /v1/completions`` (OpenAI's legacy completions: a string prompt, a list of them (one choice
each), or token ids; ``stream: true`` sends server-sent events), ``GET /v1/models``, ``GET /v1/models/ID``,
``GET /health``. Text goes through the byte tokenizer (mythos/tokenizer.py): a string prompt is BOS plus
its UTF-8 bytes, stop strings are byte sequences, EOS ends a completion (finish_reason "stop"). The stop
sequence itself is not part of the text (OpenAI's rule; the engine's tokens keep it, as generate does).
Extensions: ``n_loops`` (the request's loop budget), ``top_k``. Every refusal is a JSON error in OpenAI's
shape ``{"error": {"message", "type", "param", "code"}}`` naming the field and what is allowed; a client
that disconnects cancels its requests in the engine (docs/serving.md).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import numbers
import queue
import select
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable, Iterator, Sequence
from urllib.parse import unquote, urlsplit

import numpy as np

import spec as S

from ..tokenizer import ByteTokenizer
from .engine import Engine, EngineLoop, RequestStream, SamplingParams

MAX_BODY_BYTES = 1 << 20  # a request body beyond this is refused with 413 before it is read
MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_STOP_BYTES = 64  # one stop string, in UTF-8 bytes
DEFAULT_MAX_TOKENS = 16  # OpenAI's default, cut to the room left in max_seq_len
SOCKET_TIMEOUT_S = 60.0  # a client that sends half a request (or idles on keep-alive) is dropped after this
POLL_S = 0.25  # while a request waits for its next token, how often the server looks for a client that left
FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
          "stream_options", "n_loops", "n", "best_of", "logprobs", "echo", "suffix", "presence_penalty",
          "frequency_penalty", "logit_bias", "user")


class APIError(Exception):
    """A refused request: the HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> APIError:
    """A 400 naming the field."""
    return APIError(400, message, param=param, code="invalid_value")


# --------------------------------------------------------------------------- the request


@dataclasses.dataclass(frozen=True)
class Completion:
    """A parsed completion request: one engine request per prompt, all with the same params."""
    prompts: list[list[int]]
    params: SamplingParams
    stream: bool
    include_usage: bool


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _utf8(text: str, param: str, where: str) -> list[int]:
    """The UTF-8 bytes of text, or a 400 (JSON may carry a lone surrogate, \\ud800, that has none)."""
    try:
        return list(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise bad(param, f"{where} is not valid Unicode text: {e.reason} at character {e.start}") from None


def _neutral(v: object, ok: object) -> bool:
    """Whether v is the neutral value ok of an unsupported option (0 and 0.0 alike, but not False for 0)."""
    if isinstance(ok, bool) or isinstance(v, bool):
        return v is ok
    if isinstance(ok, numbers.Real):
        return _is_number(v) and v == ok
    return v == ok


def _prompts(prompt: object, tok: ByteTokenizer, vocab_size: int, max_prompts: int) -> list[list[int]]:
    """OpenAI's prompt forms as token-id lists: a string, a list of strings, token ids, a list of token-id lists."""
    allowed = "a string, a list of strings, a list of token ids, or a list of token-id lists"
    bos = [tok.bos_id]

    def ids(x: list, where: str) -> list[int]:
        if not x:
            raise bad("prompt", f"{where} is an empty list of token ids; give at least one id")
        for i in x:
            if not _is_int(i) or not 0 <= i < vocab_size:
                raise bad("prompt", f"{where}: token ids must be integers in [0, vocab_size={vocab_size}), got {i!r}")
        return [int(i) for i in x]

    if prompt is None:
        raise bad("prompt", f"prompt is required: {allowed}")
    if isinstance(prompt, str):
        out = [bos + _utf8(prompt, "prompt", "prompt")]  # tok.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        out = [bos + _utf8(p, "prompt", f"prompt[{j}]") for j, p in enumerate(prompt)]
    elif isinstance(prompt, list) and prompt and all(_is_int(p) for p in prompt):
        out = [ids(prompt, "prompt")]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        out = [ids(p, f"prompt[{j}]") for j, p in enumerate(prompt)]
    else:
        raise bad("prompt", f"prompt must be {allowed}; got {type(prompt).__name__}"
                  + (" (empty)" if prompt == [] else " (mixed types)" if isinstance(prompt, list) else ""))
    if len(out) > max_prompts:
        raise bad("prompt", f"prompt holds {len(out)} prompts; at most {max_prompts} per request")
    return out


def parse_completion(body: object, s: S.Spec, tok: ByteTokenizer, *, model_name: str, max_tokens_limit: int,
                     max_prompts: int, max_loops: int, draw_seed: Callable[[], int]) -> Completion:
    """A request body (parsed JSON) as a Completion, or an APIError naming the first bad field.

    Args:
        body: the JSON value of the request.
        s: the served model's spec (vocab_size, max_seq_len, loop bounds).
        tok: the byte tokenizer.
        model_name: the one model served; another name is a 404.
        max_tokens_limit: the largest max_tokens a request may ask for.
        max_prompts: the most prompts one request may hold.
        max_loops: the largest n_loops (the engine's pool holds that many loop steps).
        draw_seed: the seed of a request that gives none.
    """
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = [k for k in body if k not in FIELDS]
    if unknown:
        raise bad(unknown[0], f"unknown field {unknown[0]!r}; allowed: {', '.join(FIELDS)}")
    get = body.get
    model = get("model")
    if model is not None and model != model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {model_name!r} (GET /v1/models)",
                       param="model", code="model_not_found")
    # options OpenAI has that this server does not: refused, never silently ignored
    unsupported = {"n": (1,), "best_of": (1,), "logprobs": (), "echo": (False,), "suffix": (),
                   "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},)}
    for name, ok in unsupported.items():
        v = get(name)
        if v is not None and not any(_neutral(v, o) for o in ok):
            allowed = " or ".join(["null", *map(json.dumps, ok)])
            raise bad(name, f"{name}={json.dumps(v)} is not supported; allowed: {allowed}"
                      + (" (one choice per prompt: send a list of prompts instead)" if name in ("n", "best_of") else ""))
    if get("user") is not None and not isinstance(get("user"), str):
        raise bad("user", f"user must be a string, got {type(get('user')).__name__}")
    prompts = _prompts(get("prompt"), tok, s.vocab_size, max_prompts)

    L = s.max_seq_len
    longest = max(map(len, prompts))
    if longest >= L:
        raise bad("prompt", f"the prompt is {longest} tokens (BOS included for text), but max_seq_len={L} leaves no "
                  "room for a new token; shorten the prompt")
    max_tokens = get("max_tokens")
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, L - longest, max_tokens_limit)
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise bad("max_tokens", f"max_tokens={json.dumps(max_tokens)} must be an integer >= 1")
    elif longest + max_tokens > L:
        raise bad("max_tokens", f"the prompt ({longest} tokens) plus max_tokens={max_tokens} is {longest + max_tokens} "
                  f"tokens, more than max_seq_len={L}; ask for at most {L - longest}")
    elif max_tokens > max_tokens_limit:
        raise bad("max_tokens", f"max_tokens={max_tokens} exceeds this server's limit of {max_tokens_limit}")

    temperature = get("temperature", 1.0)
    if temperature is None:
        temperature = 1.0
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise bad("temperature", f"temperature={json.dumps(temperature)} must be a finite number >= 0 (0: greedy)")
    top_p = get("top_p")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise bad("top_p", f"top_p={json.dumps(top_p)} must be a number in (0, 1] (1: no filter)")
    top_k = get("top_k")
    if top_k is not None and top_k != -1 and (not _is_int(top_k) or not 1 <= top_k <= s.vocab_size):
        raise bad("top_k", f"top_k={json.dumps(top_k)} must be an integer in [1, vocab_size={s.vocab_size}], "
                  "or -1 or null for no filter")
    seed = get("seed")
    if seed is None:
        seed = draw_seed()
    elif not _is_int(seed) or not 0 <= seed < 2 ** 63:
        raise bad("seed", f"seed={json.dumps(seed)} must be an integer in [0, 2**63)")
    n_loops = get("n_loops")
    if n_loops is not None and (not _is_int(n_loops) or not 1 <= n_loops <= max_loops):
        raise bad("n_loops", f"n_loops={json.dumps(n_loops)} must be an integer in [1, {max_loops}] (at most this "
                  f"server's max_loops; null: recurrent.max_loop_iters={s.recurrent.max_loop_iters})")

    stop = get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
        raise bad("stop", f"stop must be a string or a list of at most {MAX_STOP} strings, got {json.dumps(stop)}")
    if len(stops) > MAX_STOP:
        raise bad("stop", f"stop holds {len(stops)} strings; at most {MAX_STOP}")
    stop_ids = []
    for j, x in enumerate(stops):
        b = _utf8(x, "stop", f"stop[{j}]")
        if not b or len(b) > MAX_STOP_BYTES:
            raise bad("stop", f"stop[{j}]={x!r} must hold 1 to {MAX_STOP_BYTES} bytes of UTF-8 text, got {len(b)}")
        stop_ids.append(tuple(b))

    stream = get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("stream", f"stream must be true or false, got {json.dumps(stream)}")
    options = get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("stream_options", "stream_options needs stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage"} or not isinstance(
                options.get("include_usage", False), bool):
            raise bad("stream_options", f"stream_options must be {{\"include_usage\": true|false}}, got "
                      f"{json.dumps(options)}")
        include_usage = options.get("include_usage", False)

    params = SamplingParams(max_tokens=int(max_tokens), temperature=float(temperature),
                            top_k=None if top_k in (None, -1) else int(top_k),
                            top_p=None if top_p in (None, 1) else float(top_p), seed=int(seed),
                            stop=tuple(stop_ids), eos_id=tok.eos_id, n_loops=n_loops)
    return Completion(prompts, params, stream, include_usage)


# --------------------------------------------------------------------------- tokens -> text


class TextAssembler:
    """One choice's tokens as text deltas: holds back tokens that may begin a stop sequence (OpenAI leaves the
    stop sequence out of the text) and bytes of an incomplete character (tokenizer.stream_decoder)."""

    def __init__(self, tok: ByteTokenizer, stop: Sequence[Sequence[int]]) -> None:
        self.tok = tok
        self.stop = [tuple(x) for x in stop]
        self.feed = tok.stream_decoder()
        self.held: list[int] = []  # tokens that may be the start of a stop sequence
        self.kept: list[int] = []  # tokens whose text is sent (or held by the decoder)
        self.sent = ""
        self.n_tokens = 0  # every token the engine generated (usage.completion_tokens)

    def _emit(self, tokens: Iterable[int]) -> str:
        text = ""
        for t in tokens:
            self.kept.append(t)
            text += self.feed(t)
        self.sent += text
        return text

    def add(self, token: int) -> str:
        """The text one new token releases ('' while held back)."""
        self.n_tokens += 1
        self.held.append(int(token))
        for k in range(len(self.held) + 1):  # the longest tail that begins a stop sequence stays held
            tail = tuple(self.held[k:])
            if not tail or any(x[:len(tail)] == tail for x in self.stop):
                break
        out, self.held = self.held[:k], self.held[k:]
        return self._emit(out)

    def finish(self, reason: str | None) -> str:
        """The text left when the request ends: held tokens less a stop sequence they end with, and the final
        character the decoder held (U+FFFD for an incomplete one, as tokenizer.decode gives)."""
        rest, self.held = self.held, []
        if reason == "stop":
            cut = max((len(x) for x in self.stop if len(x) <= len(rest) and tuple(rest[len(rest) - len(x):]) == x),
                      default=0)
            rest = rest[:len(rest) - cut]
        text = self._emit(rest)
        final = self.tok.decode(self.kept)
        tail = final[len(self.sent):] if final.startswith(self.sent) else ""
        self.sent += tail
        return text + tail


FINISH_REASONS = {"length": "length", "stop": "stop", "eos": "stop", "cancelled": "cancelled"}


# --------------------------------------------------------------------------- the server


class CompletionServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer (one thread per connection) in front of one EngineLoop.

    Binds at construction (an OSError when the address is taken); `attach(loop)` then gives it the engine, and
    `serve_forever()` (or `start_server`) serves. Limits: request bodies up to max_body_bytes (413 beyond),
    max_waiting engine requests at once (429 beyond), max_tokens up to max_tokens_limit.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], s: S.Spec, *, model_name: str, max_tokens_limit: int | None = None,
                 max_waiting: int = 64, max_body_bytes: int = MAX_BODY_BYTES, seed: int = 0,
                 socket_timeout: float = SOCKET_TIMEOUT_S, log: Callable[[str], None] | None = None) -> None:
        self.spec = s
        self.tok = ByteTokenizer.for_spec(s)
        self.model_name = model_name
        self.max_tokens_limit = s.max_seq_len - 1 if max_tokens_limit is None else int(max_tokens_limit)
        if not 1 <= self.max_tokens_limit <= s.max_seq_len:
            raise ValueError(f"max_tokens_limit={max_tokens_limit} must lie in [1, max_seq_len={s.max_seq_len}]")
        if max_waiting < 1:
            raise ValueError(f"max_waiting={max_waiting} must be >= 1")
        self.max_waiting = int(max_waiting)
        self.max_body_bytes = int(max_body_bytes)
        self.socket_timeout = socket_timeout
        self.log = log
        self.loop: EngineLoop | None = None
        self.max_loops = s.recurrent.max_loop_iters  # the engine's, from attach
        self._thread: threading.Thread | None = None
        self.created = int(time.time())
        self._lock = threading.Lock()
        self._waiting = 0
        self._seeds = np.random.default_rng(seed)  # seeds of requests that give none: a seeded server replays
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def attach(self, loop: EngineLoop) -> None:
        """The engine loop requests go to (started by the caller)."""
        self.loop = loop
        self.max_loops = loop.engine.max_loops

    def draw_seed(self) -> int:
        with self._lock:
            return int(self._seeds.integers(0, 2 ** 31))

    def reserve(self, n: int) -> None:
        """Count n more engine requests in flight, or a 429 when that passes max_waiting."""
        with self._lock:
            if self._waiting + n > self.max_waiting:
                raise APIError(429, f"too many requests in flight ({self._waiting} of at most {self.max_waiting}); "
                               "retry later", code="rate_limit_exceeded", kind="rate_limit_error")
            self._waiting += n

    def release(self, n: int) -> None:
        with self._lock:
            self._waiting -= n

    @property
    def waiting(self) -> int:
        """Engine requests in flight."""
        with self._lock:
            return self._waiting

    def close(self) -> None:
        """Stop serving (when serving in a thread), close the socket, stop the engine loop."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()
        if self.loop is not None:
            self.loop.stop()
            self.loop = None


ROUTES = {"/v1/completions": ("POST",), "/v1/models": ("GET",), "/health": ("GET",)}


class Handler(BaseHTTPRequestHandler):
    """One connection: HTTP/1.1 keep-alive, JSON errors for everything refused (never HTML, never a traceback)."""

    protocol_version = "HTTP/1.1"
    server_version = "mythos-serve"
    server: CompletionServer

    def version_string(self) -> str:
        return self.server_version  # the Server header names no Python version

    def setup(self) -> None:
        self.timeout = self.server.socket_timeout  # StreamRequestHandler: a half-sent request cannot hang a thread
        super().setup()

    # ---------------------------------------------------------------- responses

    def log_message(self, format: str, *args: object) -> None:
        if self.server.log is not None:
            self.server.log(f"{self.address_string()} {format % args}")

    def send_json(self, status: int, obj: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_api_error(self, e: APIError, headers: dict[str, str] | None = None) -> None:
        self.send_json(e.status, e.body(), headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a bad request line, headers too long, an unknown method) as JSON."""
        self.close_connection = True
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # an unparsable request line: still a status line and headers
        try:
            self.send_api_error(APIError(code, message or self.responses.get(code, ("error",))[0]))
        except OSError:
            pass

    # ---------------------------------------------------------------- routing

    def _route(self) -> None:
        path = urlsplit(self.path).path.rstrip("/") or "/"
        self._body_read = False
        try:
            allowed = ROUTES.get(path) or (("GET",) if path.startswith("/v1/models/") else None)
            if allowed is None:
                hint = " (chat is not served: a byte-level model has no chat template; use /v1/completions)" \
                    if path == "/v1/chat/completions" else ""
                raise APIError(404, f"no route {self.command} {path}{hint}; routes: POST /v1/completions, "
                               "GET /v1/models, GET /health", code="not_found")
            if self.command not in allowed:
                self._discard_body()
                self.send_api_error(APIError(405, f"{self.command} {path} is not allowed; allowed: {', '.join(allowed)}",
                                             code="method_not_allowed"), {"Allow": ", ".join(allowed)})
                return
            if path == "/health":
                ok = self.server.loop is not None
                self.send_json(200 if ok else 503, {"status": "ok" if ok else "stopped",
                                                    "model": self.server.model_name, "waiting": self.server.waiting})
            elif path == "/v1/models":
                self.send_json(200, {"object": "list", "data": [self._model_card()]})
            elif path.startswith("/v1/models/"):
                name = unquote(path[len("/v1/models/"):])
                if name != self.server.model_name:
                    raise APIError(404, f"the model {name!r} does not exist; this server serves "
                                   f"{self.server.model_name!r}", param="model", code="model_not_found")
                self.send_json(200, self._model_card())
            else:
                self._completions()
        except APIError as e:
            if not self._body_read and self.headers.get("Content-Length", "0").strip() not in ("", "0"):
                self.close_connection = True  # an unread body would be read as the next request
            self.send_api_error(e)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True
        except Exception as e:  # a bug must not leave a traceback on the wire or a connection hanging
            self.close_connection = True
            print(f"mythos serve: error in {self.command} {path}: {type(e).__name__}: {e}", file=sys.stderr)
            try:
                self.send_api_error(APIError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error"))
            except OSError:
                pass

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _route

    def _model_card(self) -> dict:
        s = self.server
        return {"id": s.model_name, "object": "model", "created": s.created, "owned_by": "mythos",
                "max_model_len": s.spec.max_seq_len}

    # ---------------------------------------------------------------- the body

    def _content_length(self) -> int:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise APIError(411, "chunked request bodies are not accepted; send Content-Length", code="length_required")
        text = self.headers.get("Content-Length")
        if text is None:
            return 0
        if not text.strip().isdigit():
            self.close_connection = True
            raise APIError(400, f"Content-Length {text!r} is not a byte count")
        return int(text)

    def _discard_body(self) -> None:
        """Read (and drop) a small body, so the connection stays usable; a large one closes it."""
        try:
            n = self._content_length()
        except APIError:
            return
        if n > self.server.max_body_bytes:
            self.close_connection = True
        elif n:
            self.rfile.read(n)
            self._body_read = True

    def _read_json(self) -> object:
        n = self._content_length()
        if n > self.server.max_body_bytes:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            raise APIError(413, f"the request body is {n:,} bytes; at most {self.server.max_body_bytes:,}",
                           code="request_too_large")
        data = self.rfile.read(n) if n else b""
        self._body_read = True
        if len(data) < n:
            self.close_connection = True
            raise APIError(400, f"the request body ended after {len(data)} of {n} bytes")
        if not data.strip():
            raise APIError(400, "the request body is empty; send a JSON object, e.g. {\"prompt\": \"hello\"}")
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    # ---------------------------------------------------------------- completions

    def _completions(self) -> None:
        srv = self.server
        body = self._read_json()
        req = parse_completion(body, srv.spec, srv.tok, model_name=srv.model_name,
                               max_tokens_limit=srv.max_tokens_limit, max_prompts=srv.max_waiting,
                               max_loops=srv.max_loops, draw_seed=srv.draw_seed)
        loop = srv.loop
        if loop is None:
            raise APIError(503, "the engine is not running", code="engine_stopped", kind="server_error")
        srv.reserve(len(req.prompts))
        streams: list = []
        done: set[int] = set()  # the streams that ended; the others are cancelled, however this call ends
        try:
            for ids in req.prompts:
                try:
                    streams.append(loop.submit(ids, req.params))
                except ValueError as e:  # the engine's own refusal names the field
                    raise APIError(400, str(e)) from None
                except RuntimeError as e:  # the loop is stopping
                    raise APIError(503, str(e), code="engine_stopped", kind="server_error") from None
            self._respond(req, streams, done)
        finally:
            for index, st in enumerate(streams):
                if index not in done:
                    loop.cancel(st.request_id)
            srv.release(len(req.prompts))

    def _client_gone(self) -> bool:
        """Whether the client closed its end (a readable socket with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _events(self, st: RequestStream, index: int, done: set[int]) -> Iterator:
        """A request's events; adds index to done at its last one (so it is not cancelled), and raises
        ConnectionResetError once the client has gone, even while the request waits (the caller cancels)."""
        while True:
            try:
                ev = st.get(timeout=POLL_S)
            except queue.Empty:
                ev = None
            if ev is not None and ev.finished:
                done.add(index)
            if ev is not None:
                yield ev
                if ev.finished:
                    return
            if self._client_gone():
                raise ConnectionResetError("the client disconnected")

    def _interleaved(self, streams: list, done: set[int]) -> Iterator[tuple[int, object]]:
        """(index, event) of every stream as the events come (the choices interleave, as OpenAI streams them);
        raises ConnectionResetError once the client has gone (the caller cancels what has not finished)."""
        active = list(range(len(streams)))
        while active:
            got = False
            for index in list(active):
                try:  # the first active stream waits a little, the others are only looked at
                    ev = streams[index].get(timeout=0 if got or index != active[0] else POLL_S / 25)
                except queue.Empty:
                    continue
                got = True
                if ev.finished:
                    done.add(index)
                    active.remove(index)
                yield index, ev
            if self._client_gone():
                raise ConnectionResetError("the client disconnected")

    def _respond(self, req: Completion, streams: list, done: set[int]) -> None:
        srv = self.server
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "object": "text_completion", "created": created, "model": srv.model_name}
        stop = req.params.stop
        n_prompt = sum(map(len, req.prompts))
        if not req.stream:
            choices, n_new = [], 0
            for index, st in enumerate(streams):
                asm, text, reason = TextAssembler(srv.tok, stop), "", None
                for ev in self._events(st, index, done):
                    if ev.token is not None:
                        text += asm.add(ev.token)
                    if ev.finished:
                        reason = ev.finish_reason
                text += asm.finish(reason)
                if reason == "cancelled":
                    raise APIError(503, "the request was cancelled: the server is stopping", code="cancelled",
                                   kind="server_error")
                n_new += asm.n_tokens
                choices.append({"text": text, "index": index, "logprobs": None,
                                "finish_reason": FINISH_REASONS.get(reason, reason)})
            usage = {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}
            self.send_json(200, {**head, "choices": choices, "usage": usage})
            return

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def send(obj: object) -> None:
            data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        extra = {"usage": None} if req.include_usage else {}

        def chunk(index: int, text: str, reason: str | None) -> None:
            send({**head, "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": reason}],
                  **extra})

        asms = [TextAssembler(srv.tok, stop) for _ in streams]
        try:
            for index, ev in self._interleaved(streams, done):
                asm = asms[index]
                text = asm.add(ev.token) if ev.token is not None else ""
                if ev.finished:
                    text += asm.finish(ev.finish_reason)
                    chunk(index, text, FINISH_REASONS.get(ev.finish_reason, ev.finish_reason))
                elif text:
                    chunk(index, text, None)
            n_new = sum(a.n_tokens for a in asms)
        except (OSError, ConnectionError):
            raise
        except Exception as e:  # the headers are out: the error goes as an event, then the stream ends
            self.close_connection = True
            print(f"mythos serve: error while streaming: {type(e).__name__}: {e}", file=sys.stderr)
            send(APIError(500, f"the engine failed: {type(e).__name__}: {e}", kind="server_error").body())
            req = dataclasses.replace(req, include_usage=False)
        if req.include_usage:
            send({**head, "choices": [], "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new,
                                                   "total_tokens": n_prompt + n_new}})
        send(b"[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


# --------------------------------------------------------------------------- starting one


def bind(s: S.Spec, host: str = "127.0.0.1", port: int = 8000, **options: object) -> CompletionServer:
    """A CompletionServer bound to host:port (port 0: a free one), or a ValueError naming --host / --port."""
    try:
        return CompletionServer((host, port), s, **options)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"--port {port}: {host}:{port} is already in use; stop what serves there, pick another "
                             "port, or give --port 0 for a free one") from None
        if e.errno == errno.EACCES:
            raise ValueError(f"--port {port}: no permission to bind {host}:{port} (ports below 1024 need root); "
                             "pick a port >= 1024") from None
        if isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL:
            raise ValueError(f"--host {host!r} is not an address of this machine: {e.strerror or e}") from None
        raise


def start_server(model: object, host: str = "127.0.0.1", port: int = 0, *, model_name: str = "mythos",
                 max_num_seqs: int = 8, block_size: int = 16, n_blocks: int | None = None,
                 max_loops: int | None = None, background: bool = True, **options: object) -> CompletionServer:
    """Serve a model: bind, build the engine and its loop, and (background=True) serve from a daemon thread.

    Args:
        model: a mythos_torch.Mythos or mythos_jax.Mythos.
        host, port: where to listen (port 0: a free port; server.url tells which).
        model_name: the name /v1/models lists and requests may give.
        max_num_seqs, block_size, n_blocks, max_loops: the Engine's (max_loops: the largest n_loops a request
            may ask for; None: recurrent.max_loop_iters).
        background: False to call serve_forever() yourself.
        options: CompletionServer's (max_tokens_limit, max_waiting, max_body_bytes, seed, log).
    Returns:
        The CompletionServer; close() stops it and the engine loop.
    """
    server = bind(model.spec, host, port, model_name=model_name, **options)
    try:
        loop = EngineLoop(Engine(model, max_num_seqs=max_num_seqs, block_size=block_size, n_blocks=n_blocks,
                                 max_loops=max_loops))
        loop.start()
    except BaseException:
        server.server_close()
        raise
    server.attach(loop)
    if background:
        server._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                          name="mythos-serve", daemon=True)
        server._thread.start()
    return server
