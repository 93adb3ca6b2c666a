"""``ankus serve``: a real server on a free loopback port, hit over HTTP with urllib / sockets.

The model is ``tiny-llama`` (random init, SmolLM2's tokenizer with its chat template). Greedy
answers are compared with the engine run in-process on the same token ids, one row each, so the
numbers are computed the same way.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from ankus.chat import ChatError, HTTPChat, LocalChat
from ankus.generation.engine import GenerationConfig, encode_prompts, generate
from ankus.models.loading import load_model

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a city."}]
NEG = [{"role": "user", "content": "Talk about Paris."}]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def _start(tiny, **kwargs):
    from ankus.serve import make_server

    model, tok = tiny
    srv = make_server(model, tok, "127.0.0.1", 0, name="tiny-llama", seed=0, quiet=True, **kwargs)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    return srv, thread


@pytest.fixture(scope="module")
def server(tiny):
    srv, thread = _start(tiny, request_timeout=2.0)
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


def call(srv, method: str, path: str, body=None, raw: bytes | None = None, headers: dict | None = None):
    """(status, decoded JSON body) of one request."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(f"http://127.0.0.1:{srv.server_address[1]}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def raw_exchange(srv, data: bytes, wait: float = 10.0) -> tuple[int, dict]:
    """Send bytes on a fresh socket, read the answer until the server closes; (status, JSON)."""
    with socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=wait) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def greedy(tiny, server, ids: list[int], max_new_tokens: int = 8, neg: list[int] | None = None, gamma: float = 1.0):
    """The engine's own greedy answer for one row of token ids (under the server's model lock)."""
    model, tok = tiny
    cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, chat_template=False, guidance_scale=gamma)
    with server.api.lock:
        return generate(model, tok, [ids], cfg, negative_prompts=None if neg is None else [neg], batch_size=16).texts[0]


def assert_alive(srv):
    status, body = call(srv, "GET", "/v1/models")
    assert status == 200 and body["data"][0]["id"] == "tiny-llama"


# ---------------------------------------------------------------------------------------------
# the endpoints


def test_models(server):
    status, body = call(server, "GET", "/v1/models")
    assert status == 200
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["tiny-llama"]
    assert body["data"][0]["object"] == "model"
    assert call(server, "GET", "/v1/models/tiny-llama")[1]["id"] == "tiny-llama"
    assert call(server, "GET", "/v1/models/other")[0] == 404


def test_chat_completion_text_and_usage(tiny, server):
    status, body = call(server, "POST", "/v1/chat/completions", {"messages": CONV, "max_tokens": 6, "seed": 1})
    assert status == 200
    assert body["object"] == "chat.completion" and body["model"] == "tiny-llama" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    usage = body["usage"]
    prompt_ids = LocalChat(model=tiny[0], tokenizer=tiny[1]).encode(CONV)
    assert usage["prompt_tokens"] == len(prompt_ids)
    assert 1 <= usage["completion_tokens"] <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # "length" exactly when the answer used every allowed token (no stop strings here)
    assert choice["finish_reason"] == ("length" if usage["completion_tokens"] == 6 else "stop")
    # same seed, same answer
    assert call(server, "POST", "/v1/chat/completions", {"messages": CONV, "max_tokens": 6, "seed": 1})[1][
        "choices"] == body["choices"]


def test_completions_list_prompt_and_n(tiny, server):
    req = {"prompt": ["Once upon a time", "The weather"], "n": 2, "max_tokens": 5, "seed": 3, "temperature": 0.9}
    status, body = call(server, "POST", "/v1/completions", req)
    assert status == 200 and body["object"] == "text_completion"
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(isinstance(c["text"], str) and c["finish_reason"] in ("stop", "length") for c in body["choices"])
    ids = encode_prompts(tiny[1], req["prompt"], chat_template=False)
    assert body["usage"]["prompt_tokens"] == sum(len(x) for x in ids)  # each prompt counted once
    assert body["usage"]["completion_tokens"] <= 4 * 5
    assert call(server, "POST", "/v1/completions", req)[1]["choices"] == body["choices"]  # seeded
    # prompt-major order: choices 0, 1 belong to prompt 0 (greedy makes the samples of a prompt equal)
    texts = [c["text"] for c in call(server, "POST", "/v1/completions", {**req, "temperature": 0})[1]["choices"]]
    assert texts[0] == texts[1] and texts[2] == texts[3]


def test_completions_logprobs_top_k(tiny, server):
    """``logprobs: k``: OpenAI's completions shape; the top-k equal the model's own log-softmax."""
    model, tok = tiny
    req = {"prompt": ["Is the sky blue? Answer:", "Two plus two is"], "max_tokens": 2, "temperature": 0, "logprobs": 5}
    status, body = call(server, "POST", "/v1/completions", req)
    assert status == 200
    for prompt, choice in zip(req["prompt"], body["choices"]):
        lp = choice["logprobs"]
        assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
        assert len(lp["tokens"]) == len(lp["top_logprobs"]) == len(lp["token_logprobs"]) >= 1
        ids = encode_prompts(tok, [prompt], chat_template=False)[0]
        with server.api.lock, torch.no_grad():
            ref = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1).topk(5)
        first = lp["top_logprobs"][0]
        assert len(first) == 5 and list(first) == [tok.decode([int(t)]) for t in ref.indices]
        assert list(first.values()) == pytest.approx(ref.values.tolist(), abs=1e-4)
        assert lp["tokens"][0] == list(first)[0]  # greedy: the first token is the top one
        assert lp["token_logprobs"][0] == pytest.approx(ref.values[0].item(), abs=1e-4)
    assert call(server, "POST", "/v1/completions", {**req, "logprobs": None})[1]["choices"][0]["logprobs"] is None


def test_httplm_judge_equals_local_judge(tiny, server):
    """The QDAIF judge over HTTP (ankus serve's completions logprobs) equals the local forward."""
    from ankus.pipelines.qd_lm import HTTPLM, JudgeError, LocalLM, judge

    local, remote = LocalLM(LocalChat(model=tiny[0], tokenizer=tiny[1])), HTTPLM(server.url)
    for text in ("I like peas.", "Kale is a vegetable that some people eat every day."):
        q = {"prompt": "Text: {text}\nIs it good? Answer yes or no.", "prefix": " Answer:"}
        with server.api.lock:
            top = local.top_logprobs([q["prompt"].replace("{text}", text)], 20, False, True, [q["prefix"]])[0]
        q["labels"] = [list(top)[0], list(top)[2]]  # a random model's answers: its own top tokens as labels
        with server.api.lock:
            expected = judge(local, [text], [q], 20, chat_template=False)
        got = judge(remote, [text], [q], 20, chat_template=False)
        assert got.shape == (1, 1) and 0 < got[0, 0] < 1 and got == pytest.approx(expected, abs=1e-4)
        with pytest.raises(JudgeError):  # labels outside the top-k
            judge(remote, [text], [{**q, "labels": ["zzzqqq", "qqqzzz"]}], 20, chat_template=False)


def test_greedy_equals_engine(tiny, server):
    prompt = "The capital of France is"
    status, body = call(server, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert status == 200
    ids = encode_prompts(tiny[1], [prompt], chat_template=False)[0]
    assert body["choices"][0]["text"] == greedy(tiny, server, ids)
    # token ids as the prompt: the same request
    assert call(server, "POST", "/v1/completions", {"prompt": ids, "max_tokens": 8, "temperature": 0})[1][
        "choices"][0]["text"] == body["choices"][0]["text"]
    chat_ids = LocalChat(model=tiny[0], tokenizer=tiny[1]).encode(CONV)
    status, body = call(server, "POST", "/v1/chat/completions", {"messages": CONV, "max_tokens": 8, "temperature": 0})
    assert body["choices"][0]["message"]["content"] == greedy(tiny, server, chat_ids)


def test_guidance_with_negative_messages(tiny, server):
    local = LocalChat(model=tiny[0], tokenizer=tiny[1])
    req = {"messages": CONV, "max_tokens": 8, "temperature": 0, "guidance_scale": 3.0, "negative_messages": NEG}
    status, body = call(server, "POST", "/v1/chat/completions", req)
    assert status == 200
    expected = greedy(tiny, server, local.encode(CONV), neg=local.encode(NEG), gamma=3.0)
    assert body["choices"][0]["message"]["content"] == expected
    # completions: negative_prompt as raw text
    ids = encode_prompts(tiny[1], ["Tell me about cities.", "Talk about Paris."], chat_template=False)
    status, body = call(server, "POST", "/v1/completions", {"prompt": "Tell me about cities.", "max_tokens": 8,
                                                              "temperature": 0, "guidance_scale": 3.0,
                                                              "negative_prompt": "Talk about Paris."})
    assert status == 200 and body["choices"][0]["text"] == greedy(tiny, server, ids[0], neg=ids[1], gamma=3.0)


def test_stop_string_cuts_and_finishes_with_stop(server):
    req = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    full = call(server, "POST", "/v1/completions", req)[1]["choices"][0]
    assert full["finish_reason"] == "length"  # a random model does not emit EOS within 8 tokens here
    stop = full["text"].strip()[2:5]
    assert stop
    cut = call(server, "POST", "/v1/completions", {**req, "stop": [stop]})[1]["choices"][0]
    assert cut["text"] == full["text"][:full["text"].find(stop)] and cut["finish_reason"] == "stop"


def test_keep_alive_serves_several_requests_on_one_connection(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    try:
        for _ in range(2):
            conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "Hi", "max_tokens": 2}),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200 and len(json.loads(resp.read())["choices"]) == 1
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# bad requests: a 4xx with an OpenAI-style JSON error, and the server still answers

LONG = [100] * 1100  # token ids: longer than tiny-llama's 1024-token context
MSG = [{"role": "user", "content": "hi"}]
BAD = [
    # (method, path, body (dict) or raw bytes, status, param)
    ("POST", "/v1/chat/completions", b"{not json", 400, None),
    ("POST", "/v1/chat/completions", b"\xff\xfe", 400, None),
    ("POST", "/v1/chat/completions", b"[1, 2]", 400, None),
    ("POST", "/v1/chat/completions", b"", 400, None),
    ("POST", "/v1/chat/completions", {}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": MSG, "temperature": "hot"}, 400, "temperature"),
    ("POST", "/v1/chat/completions", {"messages": MSG, "temperature": -0.5}, 400, "temperature"),
    ("POST", "/v1/chat/completions", {"messages": MSG, "top_p": 0}, 400, "top_p"),
    ("POST", "/v1/chat/completions", {"messages": MSG, "top_p": 1.5}, 400, "top_p"),
    ("POST", "/v1/chat/completions", {"messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    ("POST", "/v1/chat/completions", {"messages": MSG, "max_tokens": "5"}, 400, "max_tokens"),
    ("POST", "/v1/chat/completions", {"messages": MSG, "max_tokens": True}, 400, "max_tokens"),
    ("POST", "/v1/chat/completions", {"messages": MSG, "max_tokens": 100_000}, 400, "max_tokens"),
    ("POST", "/v1/chat/completions", {"messages": MSG, "max_tokens": 1020}, 400, "max_tokens"),  # prompt + this > 1024
    ("POST", "/v1/chat/completions", {"messages": MSG, "n": 0}, 400, "n"),
    ("POST", "/v1/chat/completions", {"messages": MSG, "n": 1000}, 400, "n"),
    ("POST", "/v1/chat/completions", {"messages": MSG, "n": 1.5}, 400, "n"),
    ("POST", "/v1/chat/completions", {"messages": MSG, "stop": 5}, 400, "stop"),
    ("POST", "/v1/chat/completions", {"messages": MSG, "stop": [""]}, 400, "stop"),
    ("POST", "/v1/chat/completions", {"messages": MSG, "seed": "x"}, 400, "seed"),
    ("POST", "/v1/chat/completions", {"messages": MSG, "top_k": -1}, 400, "top_k"),
    ("POST", "/v1/chat/completions", {"messages": MSG, "guidance_scale": "big"}, 400, "guidance_scale"),
    ("POST", "/v1/chat/completions", {"messages": MSG, "negative_messages": "no"}, 400, "negative_messages"),
    ("POST", "/v1/chat/completions", {"messages": MSG, "stream": True}, 400, "stream"),
    ("POST", "/v1/chat/completions", {"messages": MSG, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("POST", "/v1/chat/completions", {"messages": MSG, "max_token": 5}, 400, "max_token"),
    ("POST", "/v1/chat/completions", {"messages": MSG, "model": "gpt-4"}, 404, "model"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 1100}]}, 400, "messages"),
    ("POST", "/v1/completions", {}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": ["a", 1]}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": LONG}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": [10**9]}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": ["a"] * 40, "n": 2}, 400, "n"),
    ("POST", "/v1/completions", {"prompt": ["a", "b"], "negative_prompt": ["x", "y", "z"]}, 400, "negative_prompt"),
    ("POST", "/v1/completions", {"prompt": "a", "logprobs": 21}, 400, "logprobs"),
    ("POST", "/v1/completions", {"prompt": "a", "logprobs": True}, 400, "logprobs"),
    ("POST", "/v1/chat/completions", {"messages": MSG, "logprobs": 3}, 400, "logprobs"),
    ("GET", "/v1/nothing", None, 404, None),
    ("POST", "/v1/embeddings", {"input": "x"}, 404, None),
    ("GET", "/v1/chat/completions", None, 405, None),
    ("POST", "/v1/models", {}, 405, None),
    ("DELETE", "/v1/completions", None, 405, None),
]


@pytest.mark.parametrize("method,path,body,status,param", BAD,
                         ids=[f"{i}-{b[1].split('/')[-1]}-{b[4] or b[3]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_json_errors(server, method, path, body, status, param):
    raw = body if isinstance(body, bytes) else None
    got, answer = call(server, method, path, body=None if raw is not None else body, raw=raw)
    assert got == status, answer
    err = answer["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error" and err["code"] is None and err["param"] == param
    assert_alive(server)


def test_body_too_large(server):
    big = json.dumps({"prompt": "x" * (2 << 20)}).encode()
    status, answer = call(server, "POST", "/v1/completions", raw=big)
    assert status == 413 and "limit" in answer["error"]["message"]
    # a huge announced body is refused without being read
    status, answer = raw_exchange(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                          b"Content-Length: 100000000000\r\n\r\n{")
    assert status == 413
    assert_alive(server)


def test_missing_length_chunked_and_stalled_bodies(server):
    status, _ = raw_exchange(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 411
    status, _ = raw_exchange(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                     b"2\r\n{}\r\n0\r\n\r\n")
    assert status == 411
    status, _ = raw_exchange(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
    assert status == 400
    # a client that announces 100 bytes and sends 10 is cut off after the request timeout (2 s here)
    t0 = time.monotonic()
    status, answer = raw_exchange(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
                                          b'{"prompt":')
    assert status == 408 and time.monotonic() - t0 < 9
    # a garbage request line
    status, answer = raw_exchange(server, b"GARBAGE\r\n\r\n")
    assert status == 400 and answer["error"]["message"]
    assert_alive(server)


def test_unexpected_exception_is_a_500_and_the_server_goes_on(server, monkeypatch):
    import ankus.serve

    def boom(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(ankus.serve, "generate", boom)
    status, answer = call(server, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert status == 500 and answer["error"]["type"] == "server_error"
    assert "simulated failure" in answer["error"]["message"]
    monkeypatch.undo()
    assert call(server, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0] == 200


def test_api_key(tiny):
    srv, thread = _start(tiny, api_key="s3cret")
    try:
        assert call(srv, "GET", "/v1/models")[0] == 401
        assert call(srv, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert call(srv, "GET", "/v1/models", headers={"Authorization": "Bearer s3cret"})[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


# ---------------------------------------------------------------------------------------------
# ankus.chat.HTTPChat, the pipelines' HTTP path, against this server


def test_httpchat_greedy_equals_localchat(tiny, server):
    cfg = GenerationConfig(do_sample=False, max_new_tokens=8)
    local = LocalChat(model=tiny[0], tokenizer=tiny[1])
    remote = HTTPChat(server.url)
    with server.api.lock:
        expected = local.chat([CONV], cfg)
    assert remote.chat([CONV], cfg) == expected
    assert HTTPChat(server.url.removesuffix("/v1"), model="tiny-llama").chat([CONV], cfg) == expected
    # several conversations go out as concurrent requests; each is computed alone, as locally one by one
    convs = [CONV, MSG, [{"role": "user", "content": "Why is the sky blue?"}]]
    with server.api.lock:
        one_by_one = [local.chat([c], cfg)[0] for c in convs]
    assert remote.chat(convs, cfg) == one_by_one


def test_httpchat_guidance_equals_localchat(tiny, server):
    cfg = GenerationConfig(do_sample=False, max_new_tokens=8, guidance_scale=3.0)
    local = LocalChat(model=tiny[0], tokenizer=tiny[1])
    remote = HTTPChat(server.url)
    with server.api.lock:
        expected = local.chat([CONV], cfg, negative=[NEG])
        plain = local.chat([CONV], cfg)  # guided with the last-token default
        raw_neg = local.chat([CONV], GenerationConfig(do_sample=False, max_new_tokens=8, guidance_scale=3.0,
                                                      negative_prompt="Talk about Paris."))
    assert remote.chat([CONV], cfg, negative=[NEG]) == expected
    assert remote.chat([CONV], cfg) == plain
    assert remote.chat([CONV], GenerationConfig(do_sample=False, max_new_tokens=8, guidance_scale=3.0,
                                                negative_prompt="Talk about Paris.")) == raw_neg
    # sampling settings and top_k go through too
    out = remote.chat([CONV], GenerationConfig(max_new_tokens=4, temperature=0.8, top_k=20, top_p=0.9))
    assert len(out) == 1 and isinstance(out[0], str)


def test_httpchat_errors(server):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ChatError, match=r"cannot reach http://127\.0\.0\.1:\d+/v1/chat/completions.*server running"):
        HTTPChat(f"http://127.0.0.1:{port}", timeout=5).chat([MSG], GenerationConfig(max_new_tokens=2))
    with pytest.raises(ChatError, match="HTTP 404.*not served here"):
        HTTPChat(server.url, model="gpt-4").chat([MSG], GenerationConfig(max_new_tokens=2))


def test_httpchat_bad_answers_are_chat_errors(monkeypatch):
    def read_request_then_hang_up(listener):
        conn, _ = listener.accept()
        data = b""
        while not data.endswith(b"}") and (chunk := conn.recv(65536)):  # the JSON body's end
            data += chunk
        conn.close()

    # a server that reads the request and hangs up without answering
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        threading.Thread(target=read_request_then_hang_up, args=(listener,), daemon=True).start()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        with pytest.raises(ChatError, match="connection failed"):
            HTTPChat(url, timeout=5, workers=1).chat([MSG], GenerationConfig(max_new_tokens=2))
    # a JSON answer without a string content (e.g. a tool call)
    lm = HTTPChat("http://127.0.0.1:9/v1")
    monkeypatch.setattr(lm, "_post", lambda path, body: {"choices": [{"message": {"content": None}}]})
    with pytest.raises(ChatError, match="no choices"):
        lm.chat([MSG], GenerationConfig(max_new_tokens=2))
    # no tokens asked for: no request, empty replies, as LocalChat
    assert HTTPChat("http://127.0.0.1:9/v1").chat([MSG, MSG], GenerationConfig(max_new_tokens=0)) == ["", ""]


def test_cli_serve_help(capsys):
    from ankus.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--port" in out and "--served-name" in out and "--model" in out
