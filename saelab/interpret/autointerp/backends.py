"""Backends that answer autointerp prompts: a rule-based program, a local model, an OpenAI-compatible endpoint.

Every backend has
    generate(prompts, max_tokens) -> [reply text]          (explanations; greedy / temperature 0)
    classify(prompts) -> [Judgement(answer, p_yes)]        (detection and fuzzing: yes or no)

with p_yes = P(yes) / (P(yes) + P(no)) over the first answer token when the backend exposes
probabilities (local models always; endpoints when they return `logprobs`), else None.

Specs (`make_backend`):
    rule[:SECONDS]    a deterministic program, not a language model. Explainer: the most frequent
                      marked token(s) -> 'the word "cat"'. Scorer: reads the quoted words of the
                      explanation; detection says yes when a token of the excerpt is one of them,
                      fuzzing when every marked token is. A sanity baseline for planted features
                      and for the tests; SECONDS sleeps per request (simulates a slow model).
    http(s)://...     an OpenAI-compatible server (`/v1/chat/completions`: vLLM, llama.cpp's
                      server, `transformers serve`, a hosted API): concurrent requests, a timeout
                      per request, retries with exponential backoff, then a UsageError.
    anything else     a model for `saelab.models.load_model`: `default` (the embedded
                      SmolLM2-135M-Instruct), a .gguf file, a local model directory, a hub id.

The API key is read from the environment variable named by `--api-key-env` when a request is sent,
kept only in memory and never logged or written.
"""
from __future__ import annotations

import collections
import inspect
import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch

from saelab.errors import UsageError
from saelab.models import load_model
from saelab.interpret.autointerp.prompts import Prompt, parse_yes_no

log = logging.getLogger(__name__)

YES_WORDS, NO_WORDS = ("yes", "Yes", "YES"), ("no", "No", "NO")


class Judgement(NamedTuple):
    """A yes/no answer."""

    answer: bool | None
    """True = yes, False = no, None = the reply was neither."""
    p_yes: float | None
    """P(yes) / (P(yes) + P(no)) of the first answer token, when the backend gives probabilities."""


def judgement(text: str, p_yes: float | None) -> Judgement:
    """From probabilities when there are any (answer = p_yes >= 0.5), else from the text."""
    return Judgement(p_yes >= 0.5 if p_yes is not None else parse_yes_no(text), p_yes)


class RuleBackend:
    """Deterministic rules on the structured prompt (see module doc); no language model."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.name = "rule" + (f":{delay:g}" if delay else "")

    def _wait(self):
        if self.delay:
            time.sleep(self.delay)

    def generate(self, prompts: list[Prompt], max_tokens: int = 0) -> list[str]:
        out = []
        for p in prompts:
            self._wait()
            counts = collections.Counter(t.strip().lower() for c in p.contexts
                                         for t, m in zip(c.tokens, c.marked) if m and t.strip())
            if not counts:
                out.append("Explanation: nothing in particular")
                continue
            best = counts.most_common(1)[0][1]
            words = [w for w, n in counts.most_common(3) if 3 * n >= best]
            quoted = ", ".join(f'"{w}"' for w in words)
            out.append(f"Explanation: the word{'s' if len(words) > 1 else ''} {quoted}")
        return out

    def classify(self, prompts: list[Prompt]) -> list[Judgement]:
        out = []
        for p in prompts:
            self._wait()
            words = {w.strip().lower() for w in re.findall(r'"([^"]+)"', p.explanation)}
            ctx = p.contexts[0]
            toks = [t.strip().lower() for t in ctx.tokens]
            if p.kind == "detect":
                yes = any(t in words for t in toks)
            else:
                marked = [t for t, m in zip(toks, ctx.marked) if m]
                yes = bool(marked) and all(t in words for t in marked)
            out.append(Judgement(yes, 1.0 if yes else 0.0))
        return out


class LocalBackend:
    """A causal LM in this process (transformers): greedy generation; yes/no from next-token logits."""

    def __init__(self, spec: str, batch_size: int = 8, quiet: bool = True):
        self.lm = load_model(spec, quiet=quiet)
        self.name = f"local:{self.lm.info['name']}"
        self.batch_size = batch_size
        tok = self.lm.tokenizer
        if not getattr(tok, "chat_template", None):
            raise UsageError(f"model {spec!r} has no chat template, so it cannot take chat prompts. Use an "
                             "instruction-tuned model (the embedded `default` is one) or an endpoint.")
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.lm.model.forward).parameters
        self.yes_ids = self._single_token_ids(YES_WORDS)
        self.no_ids = self._single_token_ids(NO_WORDS)

    def _single_token_ids(self, words) -> list[int]:
        ids = set()
        for w in words:
            for text in (w, " " + w):
                enc = self.lm.tokenizer.encode(text, add_special_tokens=False)
                if len(enc) == 1:
                    ids.add(enc[0])
        return sorted(ids)

    def _texts(self, prompts: list[Prompt]) -> list[str]:
        return [self.lm.tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True)
                for p in prompts]

    def _encode(self, texts: list[str]):
        tok = self.lm.tokenizer
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], max_tokens: int = 48) -> list[str]:
        out = []
        model, tok = self.lm.model, self.lm.tokenizer
        for p in prompts:  # one at a time: no padding, so the reply is the same as an endpoint's
            enc = self._encode(self._texts([p]))
            ids = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            out.append(tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        return out

    @torch.no_grad()
    def classify(self, prompts: list[Prompt]) -> list[Judgement]:
        out = []
        for s in range(0, len(prompts), self.batch_size):
            enc = self._encode(self._texts(prompts[s:s + self.batch_size]))
            kw = {"logits_to_keep": 1} if self._keeps_logits else {}  # skip the LM head elsewhere
            logits_BV = self.lm.model(**enc, **kw).logits[:, -1].float()
            logp_BV = torch.log_softmax(logits_BV, dim=-1)
            p_yes = logp_BV[:, self.yes_ids].exp().sum(1)
            p_no = logp_BV[:, self.no_ids].exp().sum(1)
            for y, n in zip(p_yes.tolist(), p_no.tolist()):
                out.append(Judgement(y >= n, y / (y + n) if y + n > 0 else 0.5))
        return out


class EndpointBackend:
    """An OpenAI-compatible chat-completions server, called with the standard library (urllib)."""

    def __init__(self, url: str, model: str | None = None, api_key_env: str | None = None,
                 concurrency: int = 4, timeout: float = 60.0, retries: int = 3):
        base = url.rstrip("/")
        for suffix in ("/chat/completions", "/completions"):
            base = base.removesuffix(suffix)
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.api_key_env, self.concurrency = api_key_env, max(1, concurrency)
        self.timeout, self.retries = timeout, max(0, retries)
        if api_key_env and not os.environ.get(api_key_env):
            raise UsageError(f"--api-key-env {api_key_env}: that environment variable is not set or empty. "
                             f"Export it (export {api_key_env}=...) or leave --api-key-env out for a "
                             "server that needs no key.")
        self.model = model or self._first_model()
        self.name = f"endpoint:{self.base} model={self.model}"

    def _headers(self) -> dict:
        h = {"Content-Type": "application/json"}
        if self.api_key_env:
            h["Authorization"] = "Bearer " + os.environ.get(self.api_key_env, "")
        return h

    def _request(self, path: str, payload: dict | None) -> dict:
        """One call with retries: connection errors, timeouts, 429 and 5xx are retried after
        1, 2, 4, ... s; other HTTP errors and the last failure raise a UsageError."""
        url = self.base + path
        data = None if payload is None else json.dumps(payload).encode()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(2.0 ** (attempt - 1), 30.0))
            req = urllib.request.Request(url, data=data, headers=self._headers(),
                                         method="GET" if data is None else "POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return json.loads(r.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                body = e.read()[:300].decode("utf-8", "replace")
                last = f"HTTP {e.code}: {body}"
                if e.code != 429 and e.code < 500:
                    raise UsageError(f"the endpoint {url} refused the request ({last}). Check the URL, the "
                                     "model name (--explainer-model / --scorer-model) and the key "
                                     "(--api-key-env).") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                last = f"timed out after {self.timeout:g} s" if isinstance(reason, TimeoutError) or \
                    "timed out" in str(reason) else f"{type(reason).__name__}: {reason}"
            except ValueError as e:
                last = f"the reply is not JSON ({e})"
            log.debug("endpoint %s attempt %d failed: %s", url, attempt + 1, last)
        raise UsageError(f"the endpoint {url} did not answer after {self.retries + 1} attempts (last error: "
                         f"{last}). Check that the server is running and reachable, or raise --timeout / "
                         "--retries.")

    def _first_model(self) -> str:
        try:
            models = self._request("/models", None).get("data") or []
        except UsageError as e:
            raise UsageError(f"could not list the endpoint's models ({e}). Name the model with "
                             "--explainer-model / --scorer-model.") from None
        if not models:
            raise UsageError(f"the endpoint {self.base} lists no models; name one with --explainer-model / "
                             "--scorer-model.")
        return str(models[0].get("id"))

    def _map(self, fn, items):
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(fn, items))

    def generate(self, prompts: list[Prompt], max_tokens: int = 48) -> list[str]:
        def one(p):
            r = self._request("/chat/completions", {"model": self.model, "messages": p.messages,
                                                    "max_tokens": max_tokens, "temperature": 0})
            return _content(r)
        return self._map(one, prompts)

    def classify(self, prompts: list[Prompt]) -> list[Judgement]:
        def one(p):
            r = self._request("/chat/completions", {"model": self.model, "messages": p.messages, "max_tokens": 1,
                                                    "temperature": 0, "logprobs": True, "top_logprobs": 5})
            return judgement(_content(r), _p_yes(r))
        return self._map(one, prompts)


def _content(reply: dict) -> str:
    try:
        return reply["choices"][0]["message"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError):
        raise UsageError(f"the endpoint's reply is not a chat completion: {json.dumps(reply)[:300]}") from None


def _p_yes(reply: dict) -> float | None:
    """P(yes) / (P(yes) + P(no)) from the first token's top_logprobs, or None when not given."""
    try:
        top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    except (KeyError, IndexError, TypeError):
        return None
    py = sum(math.exp(t["logprob"]) for t in top if t.get("token", "").strip() in YES_WORDS)
    pn = sum(math.exp(t["logprob"]) for t in top if t.get("token", "").strip() in NO_WORDS)
    return py / (py + pn) if py + pn > 0 else None


def make_backend(spec: str, model: str | None = None, api_key_env: str | None = None, concurrency: int = 4,
                 timeout: float = 60.0, retries: int = 3, batch_size: int = 8, quiet: bool = True):
    """The backend for a spec (see module doc)."""
    if spec == "rule" or spec.startswith("rule:"):
        try:
            return RuleBackend(float(spec.partition(":")[2] or 0))
        except ValueError:
            raise UsageError(f"backend {spec!r}: expected `rule` or `rule:SECONDS`.") from None
    if spec.startswith(("http://", "https://")):
        return EndpointBackend(spec, model, api_key_env, concurrency, timeout, retries)
    if model:
        raise UsageError(f"--explainer-model / --scorer-model name a model on an endpoint; {spec!r} is not a URL.")
    return LocalBackend(spec, batch_size=batch_size, quiet=quiet)
