"""``ankus serve``: an OpenAI-compatible HTTP server over ankus' generation engine.

Endpoints (JSON in, JSON out, OpenAI's shapes)::

    GET  /v1/models             the one served model
    POST /v1/chat/completions   messages -> the tokenizer's chat template + generation prompt
    POST /v1/completions        prompt (a string, a list of strings, token ids) as raw text

Parameters: ``max_tokens`` (default 16 for completions, as OpenAI; 256 for chat; always clipped
to what the context leaves), ``temperature`` (0 = greedy), ``top_p``, ``n``, ``stop``, ``seed``;
and ankus' extensions ``top_k``, ``guidance_scale`` (classifier-free guidance gamma),
``negative_prompt`` (raw text, or one per prompt) and, for chat, ``negative_messages`` (a
conversation whose formatted tokens are the unconditional context). Completions take ``logprobs: k``
(k <= 20): OpenAI's ``tokens``, ``token_logprobs``, ``top_logprobs`` (the k most likely next
tokens at each generated position), ``text_offset``, under the raw model; an AI-feedback judge
reads label probabilities from them (``max_tokens: 1``).
``steering`` (``{"direction": NAME, "alpha": A}``: alpha times a direction the server was
started with, ``--direction NAME=FILE``, added to the residual stream;
:mod:`ankus.generation.steering`). ``stream`` is not supported.
Other OpenAI parameters are refused unless they hold their default (``presence_penalty: 0``...),
and unknown keys are refused, so a typo never silently changes nothing.

Every bad request gets a 4xx with ``{"error": {"message", "type", "param", "code"}}``; an
unexpected exception gets a 500 with the same shape and the server keeps serving. Requests run
one at a time through the model (one lock); the HTTP side is ``ThreadingHTTPServer``, so a slow
client never blocks the others, and a client that stalls mid-request is cut off after
``request_timeout`` seconds (408).
"""

from __future__ import annotations

import hmac
import json
import math
import socket
import sys
import threading
import time
import traceback
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import torch

from ankus.chat import LocalChat, check_conversation
from ankus.generation.engine import GenerationConfig, encode_prompts, eos_token_ids, generate
from ankus.generation.steering import Direction, check_direction, steer

__all__ = ["APIError", "ModelAPI", "ServeError", "make_server", "serve"]

DEFAULT_MAX_TOKENS = {"chat": 256, "completions": 16}
MAX_N = 16  # samples per prompt
MAX_ROWS = 64  # prompts x n in one request
MAX_STOP = 16
MAX_BODY_BYTES = 1 << 20
_LINGER_S, _LINGER_BYTES = 2.0, 64 << 20  # after an error: how long / how much unread input is dropped

_COMMON_KEYS = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "top_k",
                "guidance_scale", "negative_prompt", "steering"}
_CHAT_KEYS = _COMMON_KEYS | {"messages", "negative_messages", "max_completion_tokens"}
_COMPLETION_KEYS = _COMMON_KEYS | {"prompt", "logprobs"}
MAX_LOGPROBS = 20  # completions' ``logprobs``: top-k log-probs per generated token
_IGNORED_KEYS = {"user", "metadata", "store", "service_tier", "stream_options", "parallel_tool_calls"}
# OpenAI parameters ankus does not implement: accepted only at a value that changes nothing
_UNSUPPORTED = {"presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},), "logprobs": (False, 0),
                "top_logprobs": (0,), "echo": (False,), "best_of": (1,), "suffix": ("",), "tools": ([],),
                "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
                "response_format": ({"type": "text"},)}


class ServeError(RuntimeError):
    """The server could not start."""


class APIError(Exception):
    """A request the server refuses: HTTP ``status`` and an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", headers: dict | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.type = message, param, status, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": None}}


# ---------------------------------------------------------------------------------------------
# Request fields: pure checks, no model


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _integer(body: dict, key: str, default, lo: int | None = None, hi: int | None = None):
    v = body.get(key)
    if v is None:
        return default
    if not _is_int(v):
        raise APIError(f"'{key}' must be an integer, got {json.dumps(v)[:50]}", key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = f">= {lo}" if hi is None else (f"<= {hi}" if lo is None else f"between {lo} and {hi}")
        raise APIError(f"'{key}' must be {bounds}, got {v}", key)
    return v


def _number(body: dict, key: str, default: float, ok=lambda v: True, what: str = "") -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise APIError(f"'{key}' must be a finite number, got {json.dumps(v)[:50]}", key)
    if not ok(v):
        raise APIError(f"'{key}' must be {what}, got {v}", key)
    return float(v)


def _prompts(value, key: str) -> list[str | list[int]]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists -> prompts."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(x, str) for x in value):
            return list(value)
        if all(_is_int(x) for x in value):
            return [list(value)]
        if all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in value):
            return [list(x) for x in value]
    raise APIError(f"'{key}' must be a string, a non-empty list of strings, a list of token ids or a list of "
                   f"non-empty token-id lists, got {json.dumps(value)[:80]}", key)


def _messages(value, key: str) -> list[dict]:
    """OpenAI messages -> a checked conversation. Content may be a list of text parts; the
    ``developer`` role is read as ``system``."""
    if not isinstance(value, list) or not value:
        raise APIError(f"'{key}' must be a non-empty list of {{role, content}} messages", key)
    out = []
    for i, m in enumerate(value):
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            parts = m["content"]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in parts):
                raise APIError(f"'{key}', message {i}: only text content parts are supported", key)
            m = {**m, "content": "".join(p["text"] for p in parts)}
        if isinstance(m, dict) and m.get("role") == "developer":
            m = {**m, "role": "system"}
        out.append(m)
    try:
        return check_conversation(out, key)
    except ValueError as e:
        raise APIError(str(e), key) from None


def _sampling(body: dict, keys: set[str]) -> dict:
    """The sampling fields of a request, checked: everything but the prompts."""
    for k, v in body.items():
        if k in _UNSUPPORTED and k not in keys and v is not None and v not in _UNSUPPORTED[k]:
            raise APIError(f"'{k}' is not supported by ankus serve (only its default is accepted)", k)
        if k not in keys and k not in _IGNORED_KEYS and k not in _UNSUPPORTED:
            raise APIError(f"unrecognized request argument: '{k}'", k)
    if body.get("stream") not in (None, False):
        raise APIError("streaming is not supported by ankus serve; send 'stream': false", "stream")
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise APIError("'model' must be a string", "model")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)
                                 and len(stop) <= MAX_STOP):
        raise APIError(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} non-empty strings",
                       "stop")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    _integer(body, "max_tokens", None, lo=1)
    return dict(
        max_tokens=_integer(body, key, None, lo=1),
        max_tokens_key=key,
        temperature=_number(body, "temperature", 1.0, lambda v: v >= 0, ">= 0 (0 = greedy)"),
        top_p=_number(body, "top_p", 1.0, lambda v: 0 < v <= 1, "in (0, 1]"),
        top_k=_integer(body, "top_k", 0, lo=0),
        n=_integer(body, "n", 1, lo=1, hi=MAX_N),
        stop=list(stop or []),
        seed=_integer(body, "seed", None, lo=-(2 ** 63), hi=2 ** 64 - 1),
        guidance_scale=_number(body, "guidance_scale", 1.0),
        steering=_steering(body.get("steering")),
    )


def _steering(value) -> tuple[str, float] | None:
    """The ``steering`` field, checked for shape: None or (direction name, alpha)."""
    if value is None:
        return None
    if not (isinstance(value, dict) and set(value) <= {"direction", "alpha"} and isinstance(value.get("direction"), str)
            and isinstance(value.get("alpha"), (int, float)) and not isinstance(value["alpha"], bool)
            and math.isfinite(value["alpha"])):
        raise APIError("'steering' must be {\"direction\": NAME, \"alpha\": NUMBER} (a finite number)", "steering")
    return value["direction"], float(value["alpha"])


# ---------------------------------------------------------------------------------------------
# The endpoints, independent of HTTP: JSON dict in, JSON dict out


def context_length(model) -> int | None:
    """The model's context window in tokens, from its config (None when it does not say)."""
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


class ModelAPI:
    """The OpenAI endpoints over one ``(model, tokenizer)``; ``lock`` serialises model use."""

    def __init__(self, model, tokenizer, name: str, *, batch_size: int = 16, seed: int | None = None,
                 context: int | None = None, directions: dict[str, Direction] | None = None) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.directions = dict(directions or {})
        for key, d in self.directions.items():
            check_direction(d, model, where=f"direction '{key}'")
        self.batch_size = batch_size
        self.context = context or context_length(model) or 2048
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.eos = set(eos_token_ids(model, tokenizer))
        self.chat = LocalChat(model=model, tokenizer=tokenizer) if getattr(tokenizer, "chat_template", None) else None
        self.generator = torch.Generator()  # requests without a seed draw from here
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.created = int(time.time())
        self.lock = threading.Lock()

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "ankus"}

    def _check_model(self, body: dict) -> None:
        if body.get("model") not in (None, self.name):
            raise APIError(f"model '{body['model']}' is not served here; this server serves '{self.name}'",
                           "model", status=404)

    def chat_completions(self, body: dict) -> dict:
        params = _sampling(body, _CHAT_KEYS)
        self._check_model(body)
        if self.chat is None:
            raise APIError(f"model '{self.name}' has no chat template; use /v1/completions", "messages")
        if "messages" not in body:
            raise APIError("missing required field 'messages'", "messages")
        messages = _messages(body["messages"], "messages")
        negative = None
        if body.get("negative_messages") is not None:
            if body.get("negative_prompt") is not None:
                raise APIError("give 'negative_messages' or 'negative_prompt', not both", "negative_prompt")
            negative = _messages(body["negative_messages"], "negative_messages")
        elif body.get("negative_prompt") is not None:
            negative = body["negative_prompt"]
            if not isinstance(negative, str):
                raise APIError("'negative_prompt' must be a string in a chat request", "negative_prompt")
        with self.lock:
            ids = [self._encode_chat(messages, "messages")]
            if isinstance(negative, list):
                neg = [self._encode_chat(negative, "negative_messages")]
            else:
                neg = None if negative is None else encode_prompts(self.tokenizer, [negative], chat_template=False)
            choices, usage = self._run(ids, neg, params, "chat")
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": finish} for i, (text, finish, _) in enumerate(choices)],
                "usage": usage}

    def completions(self, body: dict) -> dict:
        params = _sampling(body, _COMPLETION_KEYS)
        self._check_model(body)
        if "prompt" not in body:
            raise APIError("missing required field 'prompt'", "prompt")
        prompts = _prompts(body["prompt"], "prompt")
        negative = None
        if body.get("negative_prompt") is not None:
            negative = _prompts(body["negative_prompt"], "negative_prompt")
            if len(negative) == 1:
                negative = negative * len(prompts)
            elif len(negative) != len(prompts):
                raise APIError(f"'negative_prompt' has {len(negative)} entries for {len(prompts)} prompts; "
                               "give one for all or one per prompt", "negative_prompt")
        top_k = _integer(body, "logprobs", 0, lo=0, hi=MAX_LOGPROBS)
        if len(prompts) * params["n"] > MAX_ROWS:
            raise APIError(f"{len(prompts)} prompts x n={params['n']} asks for more than {MAX_ROWS} completions "
                           "in one request", "n")
        with self.lock:
            ids = self._encode_raw(prompts, "prompt")
            neg = None if negative is None else self._encode_raw(negative, "negative_prompt")
            choices, usage = self._run(ids, neg, params, "completions", top_k)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.name,
                "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}
                            for i, (text, finish, lp) in enumerate(choices)],
                "usage": usage}

    # -- under the lock ------------------------------------------------------------------------

    def _direction(self, name: str) -> Direction:
        if name not in self.directions:
            known = ", ".join(sorted(self.directions)) or "none (start the server with --direction NAME=FILE)"
            raise APIError(f"unknown steering direction '{name}'; this server has: {known}", "steering")
        return self.directions[name]

    def _encode_chat(self, messages: list[dict], key: str) -> list[int]:
        try:
            return self.chat.encode(messages)
        except Exception as e:  # noqa: BLE001 - a template that refuses this conversation (e.g. role order)
            raise APIError(f"'{key}' cannot be formatted with the chat template: {type(e).__name__}: {e}", key) from None

    def _encode_raw(self, prompts: list[str | list[int]], key: str) -> list[list[int]]:
        for p in prompts:
            if isinstance(p, list) and not all(0 <= t < self.vocab_size for t in p):
                raise APIError(f"'{key}' has a token id outside [0, {self.vocab_size})", key)
        return encode_prompts(self.tokenizer, prompts, chat_template=False)

    def _run(self, ids: list[list[int]], neg: list[list[int]] | None, p: dict, kind: str, top_k: int = 0
             ) -> tuple[list[tuple[str, str, dict | None]], dict]:
        """Generate ``n`` completions per prompt (ids: one token-id list per prompt). Returns
        ``[(text, finish_reason, logprobs)]`` in OpenAI's order (prompt-major) and the usage counts;
        ``logprobs`` is None unless ``top_k`` > 0 (:meth:`_logprobs`)."""
        what = "messages" if kind == "chat" else "prompt"
        longest = max(len(x) for x in ids + (neg or []))
        if p["max_tokens"] is not None and p["max_tokens"] > self.context:
            raise APIError(f"'{p['max_tokens_key']}' must be at most {self.context}, the model's context length",
                           p["max_tokens_key"])
        if longest >= self.context:
            raise APIError(f"the {what} has {longest} tokens; the model's context is {self.context} tokens", what)
        max_tokens = p["max_tokens"] or min(DEFAULT_MAX_TOKENS[kind], self.context - longest)
        if longest + max_tokens > self.context:
            raise APIError(f"the model's context is {self.context} tokens, but the {what} has {longest} and "
                           f"'{p['max_tokens_key']}' asks for {max_tokens} more", p["max_tokens_key"])
        greedy = p["temperature"] == 0
        config = GenerationConfig(max_new_tokens=max_tokens, do_sample=not greedy,
                                  temperature=1.0 if greedy else p["temperature"], top_k=p["top_k"],
                                  top_p=p["top_p"], stop_strings=p["stop"], guidance_scale=p["guidance_scale"],
                                  chat_template=False)
        n = p["n"]
        rows = [x for x in ids for _ in range(n)]  # prompt-major: choice i*n + j is sample j of prompt i
        neg_rows = None if neg is None else [x for x in neg for _ in range(n)]
        gen = self.generator if p["seed"] is None else torch.Generator().manual_seed(p["seed"])
        if p["steering"] is None:
            out = generate(self.model, self.tokenizer, rows, config, negative_prompts=neg_rows, generator=gen,
                           batch_size=self.batch_size)
        else:
            out = steer(self.model, self.tokenizer, rows, self._direction(p["steering"][0]), p["steering"][1], config,
                        negative_prompts=neg_rows, generator=gen, batch_size=self.batch_size)
        lengths = out.response_mask.sum(-1).tolist()  # (B,) generated tokens per row, EOS included
        choices = []
        for r, text in enumerate(out.texts):
            tokens = out.response_ids[r, :lengths[r]].tolist()
            ended = bool(tokens) and tokens[-1] in self.eos
            if not ended and p["stop"]:  # a stop string may have ended the row on its last allowed token
                full = self.tokenizer.decode(tokens, skip_special_tokens=True)
                ended = any(s in full for s in p["stop"])
            choices.append((text, "stop" if ended or lengths[r] < max_tokens else "length",
                            self._logprobs(rows[r], tokens, top_k) if top_k else None))
        prompt_tokens, completion_tokens = sum(len(x) for x in ids), int(sum(lengths))
        return choices, {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}


    @torch.no_grad()
    def _logprobs(self, prompt: list[int], tokens: list[int], k: int) -> dict:
        """OpenAI's completions ``logprobs`` for one row: each generated token, its log-prob and
        the top-``k`` tokens with theirs, under the raw model (T = 1, no filtering, no guidance),
        from one forward over prompt + completion."""
        full = torch.tensor([prompt + tokens], device=self.model.device)  # (1, P + N)
        logits = self.model(input_ids=full).logits[0, len(prompt) - 1:-1].float()  # (N, V)
        logp = torch.log_softmax(logits, -1)
        values, index = logp.topk(k, dim=-1)  # (N, k)
        names = [self.tokenizer.decode([t]) for t in tokens]
        offsets = [sum(len(x) for x in names[:i]) for i in range(len(names))]
        return {"tokens": names, "token_logprobs": [float(logp[i, t]) for i, t in enumerate(tokens)],
                "top_logprobs": [{self.tokenizer.decode([int(t)]): float(v) for t, v in zip(index[i], values[i])}
                                 for i in range(len(tokens))],
                "text_offset": offsets}


# ---------------------------------------------------------------------------------------------
# HTTP


_ROUTES = {"/v1/models": {"GET": "models"}, "/v1/chat/completions": {"POST": "chat_completions"},
           "/v1/completions": {"POST": "completions"}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response carries Content-Length
    server_version = "ankus-serve"
    server: "_Server"

    def setup(self) -> None:
        self.timeout = self.server.request_timeout  # socket timeout: a stalled client cannot hold a thread
        super().setup()

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path.rstrip("/") or "/"
        try:
            api = self.server.api
            if path.startswith("/v1/models/"):
                route = {"GET": "model"}
            elif path in _ROUTES:
                route = _ROUTES[path]
            else:
                raise APIError(f"unknown route {self.command} {path}; this server has GET /v1/models, "
                               "POST /v1/chat/completions and POST /v1/completions", status=404)
            if self.command not in route:
                allowed = ", ".join(route)
                raise APIError(f"{path} does not accept {self.command}; use {allowed}", status=405,
                               headers={"Allow": allowed})
            self._check_key()
            if route[self.command] == "model":
                model_id = path[len("/v1/models/"):]
                if model_id != api.name:
                    raise APIError(f"model '{model_id}' is not served here; this server serves '{api.name}'",
                                   "model", status=404)
                status, payload = 200, api.model_card()
            elif self.command == "GET":
                status, payload = 200, getattr(api, route["GET"])()
            else:
                status, payload = 200, getattr(api, route["POST"])(self._read_json())
            headers = {}
        except APIError as e:
            status, payload, headers = e.status, e.body(), e.headers
        except Exception as e:  # noqa: BLE001 - report, keep serving
            traceback.print_exc(file=sys.stderr)
            status, headers = 500, {}
            payload = APIError(f"internal server error: {type(e).__name__}: {e}", type="server_error").body()
        self._send(status, payload, headers)

    def _check_key(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError("missing or wrong API key (send 'Authorization: Bearer <key>')", status=401)

    def _read_json(self) -> dict:
        if self.headers.get("Transfer-Encoding", "identity").lower() != "identity":
            raise APIError("chunked request bodies are not supported; send Content-Length", status=411)
        length = self.headers.get("Content-Length")
        if length is None:
            raise APIError("a POST needs a Content-Length header and a JSON body", status=411)
        try:
            size = int(length)
            if size < 0:
                raise ValueError
        except ValueError:
            raise APIError(f"bad Content-Length: {length!r:.40}") from None
        if size > self.server.max_body:
            raise APIError(f"request body of {size} bytes is over the limit of {self.server.max_body}", status=413)
        try:
            raw = self.rfile.read(size)
        except TimeoutError:
            raise APIError(f"the request body did not arrive within {self.server.request_timeout:g} s",
                           status=408) from None
        if len(raw) < size:
            raise APIError(f"the body ended after {len(raw)} of {size} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:  # bad UTF-8 or bad JSON; absurd nesting
            raise APIError(f"the request body is not valid JSON: {e}"[:300]) from None
        if not isinstance(body, dict):
            raise APIError(f"the request body must be a JSON object, got a {type(body).__name__}")
        return body

    def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode("utf-8")
        close = status >= 400  # the body may be unread: do not reuse the connection
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            if close:
                self._linger()
        except OSError:  # the client went away; nothing to tell it
            self.close_connection = True

    def _linger(self) -> None:
        """Half-close, then read and drop what the client still sends (an unread body) for a
        moment: closing a socket with unread input sends a reset, which can destroy the error
        response before the client reads it."""
        self.connection.shutdown(socket.SHUT_WR)
        deadline, dropped = time.monotonic() + _LINGER_S, 0
        while dropped < _LINGER_BYTES and (left := deadline - time.monotonic()) > 0:
            self.connection.settimeout(left)
            try:
                chunk = self.connection.recv(1 << 16)
            except TimeoutError:
                break
            if not chunk:
                break
            dropped += len(chunk)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, unknown method, headers too long) as JSON."""
        if getattr(self, "command", None) is None:
            self.command = ""
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":  # an unparsable request line:
            self.request_version = "HTTP/1.0"                          # still answer with headers
        text = message or HTTPStatus(code).phrase
        self._send(code, APIError(f"{text}" + (f": {explain}" if explain else "")).body())

    def log_message(self, format: str, *args) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, api: ModelAPI, *, api_key: str | None, max_body: int, request_timeout: float,
                 quiet: bool) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.api, self.api_key, self.max_body = api, api_key, max_body
        self.request_timeout, self.quiet = request_timeout, quiet
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def make_server(model, tokenizer, host: str = "127.0.0.1", port: int = 8000, *, name: str = "local",
                api_key: str | None = None, batch_size: int = 16, seed: int | None = None,
                max_body: int = MAX_BODY_BYTES, request_timeout: float = 60.0, quiet: bool = False,
                directions: dict[str, Direction] | None = None) -> _Server:
    """A bound, not yet running server (``.serve_forever()``, ``.shutdown()``, ``.url``); port 0
    picks a free port. ``directions``: name -> steering direction for requests' ``steering``."""
    api = ModelAPI(model, tokenizer, name, batch_size=batch_size, seed=seed, directions=directions)
    return _Server((host, port), api, api_key=api_key, max_body=max_body, request_timeout=request_timeout,
                   quiet=quiet)


def serve(spec: str, host: str = "127.0.0.1", port: int = 8000, *, served_name: str | None = None,
          device: str = "cpu", direction_files: dict[str, str] | None = None, **kwargs) -> None:
    """Load ``spec`` (anything :func:`ankus.load_model` accepts) and serve it until Ctrl-C;
    ``direction_files``: name -> direction file, for requests' ``steering``."""
    from ankus.generation.steering import load_direction
    from ankus.models.loading import load_model

    model, tokenizer = load_model(spec, device=device)
    kwargs["directions"] = {k: load_direction(f, model) for k, f in (direction_files or {}).items()}
    try:
        server = make_server(model, tokenizer, host, port, name=served_name or spec, **kwargs)
    except OSError as e:  # the port is taken, the address is not this machine's...
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    print(f"ankus serve: {served_name or spec} on {server.url} (Ctrl-C stops)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1") and kwargs.get("api_key") is None:
        print("warning: listening beyond this machine with no --api-key: anyone who can reach it can use it",
              file=sys.stderr, flush=True)
    run_until_interrupted(server)


def run_until_interrupted(server) -> None:
    """Serve until Ctrl-C, then close the socket (``ankus serve``, ``ankus search serve``)."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
