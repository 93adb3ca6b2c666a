"""Chat backends: one call, ``chat(conversations, config) -> replies``, over a local model or an
OpenAI-compatible HTTP endpoint.

Pipelines that need an LM to write text (Direct Principle Feedback writes dialogues, critiques
and revisions) take a backend instead of a model, so a stronger model behind an HTTP server can
stand in for the local SmolLM2 without changing the pipeline::

    lm = chat_backend("smollm2-135m-instruct")          # local: ankus' generation engine
    lm = chat_backend("http://127.0.0.1:8000/v1")       # any OpenAI-compatible server, e.g. `ankus serve`
    replies = lm.chat([[{"role": "user", "content": "Name a city."}]], GenerationConfig(max_new_tokens=16))

A conversation is a list of ``{"role": "system" | "user" | "assistant", "content": str}``
messages; the reply continues it as the assistant. Classifier-free guidance takes one
negative conversation per conversation (its formatted tokens are the unconditional context).
Over HTTP, guidance and ``top_k`` go out as the extension fields ``guidance_scale``,
``negative_messages`` and ``top_k``, which ``ankus serve`` understands; they are sent only when
set, so plain OpenAI-compatible servers see a plain request.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Sequence

import torch

from ankus.generation.engine import GenerationConfig, generate

__all__ = ["LocalChat", "HTTPChat", "ChatError", "chat_backend", "check_conversation"]

Conversation = Sequence[dict]

_ROLES = ("system", "user", "assistant")


class ChatError(RuntimeError):
    """A backend could not produce a reply (HTTP failure, malformed answer, bad conversation)."""


def check_conversation(messages, where: str = "conversation") -> list[dict]:
    """Validate one conversation; returns it as a list of {role, content} dicts."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of messages, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}, message {i}: expected {{'role': ..., 'content': ...}}, got {m!r:.80}")
        if m["role"] not in _ROLES:
            raise ValueError(f"{where}, message {i}: role must be one of {_ROLES}, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}, message {i}: content must be a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


class LocalChat:
    """Replies from a local model through ankus' generation engine (chat template applied).

    ``spec`` is anything :func:`ankus.load_model` accepts; or pass ``model`` and ``tokenizer``.
    Sampling is seeded (``seed``), so a pipeline step run twice writes the same text.
    """

    def __init__(self, spec: str | None = None, *, model=None, tokenizer=None, batch_size: int = 16,
                 seed: int = 0) -> None:
        if model is None:
            from ankus.models.loading import load_model

            model, tokenizer = load_model(spec or "smollm2-135m-instruct")
        if tokenizer is None:
            raise ValueError("LocalChat(model=...) needs tokenizer= too")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"model {spec or type(model).__name__} has no chat template; "
                             "a chat backend needs a chat (instruct) model")
        self.model, self.tokenizer = model, tokenizer
        self.name = spec or getattr(model.config, "_name_or_path", "local")
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def encode(self, messages: Conversation) -> list[int]:
        """Token ids of a conversation formatted for the assistant's next turn."""
        text = self.tokenizer.apply_chat_template(check_conversation(messages), add_generation_prompt=True,
                                                  tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat(self, conversations: Sequence[Conversation], config: GenerationConfig | None = None,
             negative: Sequence[Conversation] | None = None) -> list[str]:
        config = config or GenerationConfig()
        if not conversations:
            return []
        ids = [self.encode(c) for c in conversations]
        neg = None
        if negative is not None:
            if len(negative) != len(conversations):
                raise ValueError(f"got {len(negative)} negative conversations for {len(conversations)} conversations")
            neg = [self.encode(c) for c in negative]
        out = generate(self.model, self.tokenizer, ids, replace(config, chat_template=False), negative_prompts=neg,
                       generator=self.generator, batch_size=self.batch_size)
        return [t.strip() for t in out.texts]


class HTTPChat:
    """Replies from an OpenAI-compatible ``/v1/chat/completions`` endpoint (one request per
    conversation, ``workers`` in flight). ``base_url`` ends in ``/v1`` (added when missing)."""

    def __init__(self, base_url: str, model: str | None = None, *, api_key: str | None = None,
                 timeout: float = 300.0, workers: int = 4) -> None:
        base = base_url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.workers = workers
        self.name = f"{self.base_url} ({model or 'server default'})"

    def _post(self, path: str, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.base_url + path, data=json.dumps(body).encode(), headers=headers,
                                     method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:500]
            raise ChatError(f"{self.base_url}{path} answered HTTP {e.code}: {detail}") from None
        except urllib.error.URLError as e:
            raise ChatError(f"cannot reach {self.base_url}{path}: {e.reason}. Is the server running?") from None
        except TimeoutError:
            raise ChatError(f"{self.base_url}{path} did not answer within {self.timeout:g} s") from None
        except (OSError, http.client.HTTPException) as e:  # reset or dropped connection mid-answer
            raise ChatError(f"{self.base_url}{path}: the connection failed: {type(e).__name__}: {e}") from None
        except ValueError:  # bad JSON or bad UTF-8
            raise ChatError(f"{self.base_url}{path} did not answer with JSON") from None

    def request_body(self, messages: Conversation, config: GenerationConfig,
                     negative: Conversation | None = None) -> dict:
        body: dict = {"messages": check_conversation(messages), "max_tokens": config.max_new_tokens}
        if self.model:
            body["model"] = self.model
        if config.do_sample:
            body.update(temperature=config.temperature, top_p=config.top_p)
        else:
            body["temperature"] = 0.0
        if config.stop_strings:
            body["stop"] = list(config.stop_strings)
        if config.top_k:
            body["top_k"] = config.top_k
        if config.guidance_scale != 1.0:
            body["guidance_scale"] = config.guidance_scale
            if negative is not None:
                body["negative_messages"] = check_conversation(negative, "negative conversation")
            elif config.negative_prompt is not None:  # raw text, as LocalChat's engine reads it
                body["negative_prompt"] = config.negative_prompt
        return body

    def chat(self, conversations: Sequence[Conversation], config: GenerationConfig | None = None,
             negative: Sequence[Conversation] | None = None) -> list[str]:
        config = config or GenerationConfig()
        if negative is not None and len(negative) != len(conversations):
            raise ValueError(f"got {len(negative)} negative conversations for {len(conversations)} conversations")
        bodies = [self.request_body(c, config, negative[i] if negative is not None else None)
                  for i, c in enumerate(conversations)]
        if config.max_new_tokens == 0:  # as LocalChat; OpenAI servers refuse max_tokens=0
            return [""] * len(bodies)

        def one(body: dict) -> str:
            answer = self._post("/chat/completions", body)
            try:
                content = answer["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                content = None
            if not isinstance(content, str):  # e.g. a tool call, whose content is null
                raise ChatError(f"{self.base_url}/chat/completions: no choices[0].message.content string in "
                                f"{json.dumps(answer)[:300]}")
            return content.strip()

        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            return list(pool.map(one, bodies))


def chat_backend(spec: str, *, model: str | None = None, api_key: str | None = None, **kwargs):
    """``http(s)://...`` -> :class:`HTTPChat` (``model`` names the served model); anything else is a
    model spec for :class:`LocalChat`."""
    if spec.startswith(("http://", "https://")):
        return HTTPChat(spec, model, api_key=api_key, **{k: v for k, v in kwargs.items() if k in ("timeout", "workers")})
    return LocalChat(spec, **{k: v for k, v in kwargs.items() if k in ("batch_size", "seed")})
