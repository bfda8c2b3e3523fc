"""Feedback models: who answers the critique, revision and comparison questions of Constitutional AI.

One interface, two back ends:

    fb = make_feedback(cfg, cache_path)              # cfg: tether.config.FeedbackConfig
    fb.chat([ChatRequest(messages, max_tokens=96, temperature=0.7, seed=3), ...]) -> [ChatReply, ...]
    fb.choose([ChoiceRequest(messages, options=("A", "B")), ...])               -> [ChoiceReply, ...]

- `LocalFeedback`: any causal LM tether loads (default the embedded SmolLM2-135M-Instruct). Answers
  are sampled on the rollout engine (tether.engine); a choice is read from one forward pass: the
  log-probabilities of the option tokens where the answer starts.
- `HTTPFeedback`: any OpenAI-compatible chat-completions server (`tether serve`, vLLM, a hosted API)
  through the `openai` client, which retries 408/409/429/5xx with exponential back-off and applies the
  timeout. Requests run concurrently up to `concurrency`. A choice comes from `top_logprobs` when the
  server returns them (a soft label), else from the option letter parsed out of the reply (a hard
  label, recorded as such). The API key is read from the environment variable the user names; it is
  never logged, cached or written to a run folder.

Every successful answer is cached on disk (JSONL, one line per answer, appended as it arrives) under
a SHA-256 of the request and the feedback model's identity, so a rerun sends nothing it has an answer
for and a crash loses at most the answers in flight. A failed request is never turned into an answer:
it comes back with `error` set, and is not cached (a rerun tries it again). A server that cannot be
reached at all, or refuses the credentials, stops the run with a clear error (`FeedbackUnavailable`);
what was answered before stays cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tether.errors import TetherError

log = logging.getLogger("tether")


class FeedbackUnavailable(TetherError):
    """The feedback model cannot answer at all (unreachable server, rejected credentials, unknown model)."""


@dataclass
class ChatRequest:
    messages: list[dict]
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0  # tells apart samples of the same request (part of the cache key)


@dataclass
class ChatReply:
    text: str = ""
    finished: bool = True  # False: cut at max_tokens
    error: str = ""        # non-empty: the request failed, and `text` means nothing


@dataclass
class ChoiceRequest:
    """A multiple-choice question. The last message may be the assistant's: its content is then the start
    of the answer (e.g. "The answer is (") and the option is read right after it."""
    messages: list[dict]
    options: tuple = ("A", "B")


@dataclass
class ChoiceReply:
    logprobs: dict[str, float] = field(default_factory=dict)  # option -> log-prob where the answer starts (soft)
    answer: str = ""   # the option chosen: the most likely one (soft), or the one parsed from the text (hard)
    kind: str = ""     # "soft" (log-probs) or "hard" (parsed text)
    text: str = ""     # the reply's text, when one was generated
    error: str = ""


class Cache:
    """Answers on disk: one JSON line per answer, appended (and flushed) as each arrives, thread-safe."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.data: dict[str, dict] = {}
        self.hits = self.misses = 0
        self._lock = threading.Lock()
        if self.path and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.data[row["key"]] = row["value"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut by a crash: that answer is asked again

    @staticmethod
    def key(identity: dict, op: str, request) -> str:
        blob = json.dumps({"v": 1, "feedback": identity, "op": op, "request": asdict(request)}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        with self._lock:
            value = self.data.get(key)
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
            return value

    def put(self, key: str, value: dict) -> None:
        with self._lock:
            self.data[key] = value
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n")


class Feedback:
    """The cached front of every back end: subclasses implement `_chat` and `_choose` on the requests the
    cache cannot answer, and return replies in order (failures with `error` set)."""

    identity: dict = {}

    def __init__(self, cache: Cache | None = None):
        self.cache = cache or Cache(None)
        self.failures: list[dict] = []  # every failed request: {"op", "error"}

    def chat(self, requests: list[ChatRequest], desc: str | None = None) -> list[ChatReply]:
        return self._cached("chat", requests, self._chat, ChatReply, desc)

    def choose(self, requests: list[ChoiceRequest], desc: str | None = None) -> list[ChoiceReply]:
        for r in requests:
            if len(r.options) < 2 or len(set(r.options)) < len(r.options):
                raise ValueError(f"a choice needs at least two distinct options, got {r.options}")
        return self._cached("choose", requests, self._choose, ChoiceReply, desc)

    def _cached(self, op, requests, run, reply_cls, desc):
        keys = [Cache.key(self.identity, op, r) for r in requests]
        out: list = [None] * len(requests)
        todo = []
        for i, k in enumerate(keys):
            hit = self.cache.get(k)
            if hit is not None:
                out[i] = reply_cls(**hit)
            else:
                todo.append(i)
        if todo:
            def store(j: int, reply) -> None:  # called as each answer arrives, so a crash keeps the rest
                i = todo[j]
                out[i] = reply
                if reply.error:
                    self.failures.append({"op": op, "error": reply.error})
                else:
                    self.cache.put(keys[i], asdict(reply))

            run([requests[i] for i in todo], store, desc)
        return out

    def _chat(self, requests, store, desc):
        raise NotImplementedError

    def _choose(self, requests, store, desc):
        raise NotImplementedError

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# Option tokens


def normalise_option(token: str) -> str:
    """' (A' -> 'A', 'B)' -> 'B', '**A**' -> 'A': the option a token names, or the token stripped."""
    return token.strip().strip("()[]*:.\"'").strip()


def option_logprobs(top: dict[str, float], options: tuple) -> dict[str, float]:
    """Log-probability of each option from a token -> log-prob table: the log of the summed probability of
    every token that names the option (' A', 'A', '(A' all name A). An option no token names gets -inf."""
    out = {}
    for o in options:
        lps = [lp for t, lp in top.items() if normalise_option(t) == o]
        out[o] = torch.logsumexp(torch.tensor(lps, dtype=torch.float64), 0).item() if lps else -math.inf
    return out


def parse_option(text: str, options: tuple) -> str:
    """The first option named in a reply as a standalone token ('(B)', 'Response A', 'A.'), or ''."""
    pattern = r"(?<![A-Za-z0-9])(" + "|".join(re.escape(o) for o in options) + r")(?![A-Za-z0-9])"
    m = re.search(pattern, text)
    return m.group(1) if m else ""


def _soft_reply(lps: dict[str, float], text: str = "") -> ChoiceReply:
    finite = {o: v for o, v in lps.items() if v > -math.inf}
    if not finite:
        return ChoiceReply(error="no option token among the reply's log-probs", text=text)
    return ChoiceReply(logprobs=lps, answer=max(finite, key=finite.get), kind="soft", text=text)


# --------------------------------------------------------------------------------------------------
# Local model


class LocalFeedback(Feedback):
    """A causal LM in this process: the rollout engine samples, one teacher-forced forward reads choices."""

    def __init__(self, name: str, cache: Cache | None = None, dtype: str = "auto", batch_size: int = 32,
                 trust_remote_code: bool = False):
        from tether.engine import Engine
        from tether.models import default_device, load_causal_lm, load_tokenizer, resolve_dtype

        super().__init__(cache)
        self.device = default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.tok = load_tokenizer(name, trust_remote_code)
        self.model = load_causal_lm(name, trust_remote_code).to(self.device).eval()
        self.model.requires_grad_(False)
        self.engine = Engine(self.model, self.tok, self.dtype)
        self.batch_size = batch_size
        self.identity = {"local": name}
        self._option_ids: dict[tuple, dict[str, list[int]]] = {}

    def _chat(self, requests, store, desc):
        from tether.rollout import prompt_ids

        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):  # one engine call per sampling setting
            groups.setdefault((r.max_tokens, r.temperature, r.top_p), []).append(i)
        bar = tqdm(total=len(requests), desc=desc, unit="req", disable=desc is None, dynamic_ncols=True)
        try:
            for (max_tokens, temperature, top_p), idx in groups.items():
                for s in range(0, len(idx), self.batch_size):
                    chunk = idx[s : s + self.batch_size]
                    # a batch samples under the seed of its first request: reproducible for the same requests
                    torch.manual_seed(requests[chunk[0]].seed)
                    ids = prompt_ids(self.tok, [requests[i].messages for i in chunk])
                    out = self.engine.generate(ids, max_tokens, temperature, top_p, batch_size=len(chunk))
                    for j, r_ids, fin in zip(chunk, out.response_ids, out.finished):
                        text = self.tok.decode(r_ids[:-1] if fin else r_ids, skip_special_tokens=True).strip()
                        store(j, ChatReply(text=text, finished=fin))
                    bar.update(len(chunk))
        finally:
            bar.close()

    def option_ids(self, options: tuple) -> dict[str, list[int]]:
        """Every vocabulary token that names each option (as `normalise_option` reads tokens)."""
        if options not in self._option_ids:
            table: dict[str, list[int]] = {o: [] for o in options}
            for t in range(len(self.tok)):
                name = normalise_option(self.tok.decode([t]))
                if name in table:
                    table[name].append(t)
            missing = [o for o, ids in table.items() if not ids]
            if missing:
                raise TetherError(f"the feedback model's tokenizer has no token for option(s) {missing}")
            self._option_ids[options] = table
        return self._option_ids[options]

    @torch.no_grad()
    def _choose(self, requests, store, desc):
        from tether.models import autocast
        from tether.rollout import prompt_ids

        bar = tqdm(total=len(requests), desc=desc, unit="q", disable=desc is None, dynamic_ncols=True)
        try:
            for s in range(0, len(requests), self.batch_size):
                chunk = requests[s : s + self.batch_size]
                seqs = prompt_ids(self.tok, [r.messages for r in chunk])  # a trailing assistant message is continued
                T = max(map(len, seqs))
                x = torch.zeros(len(seqs), T, dtype=torch.long)
                mask = torch.zeros(len(seqs), T, dtype=torch.long)
                for j, q in enumerate(seqs):  # left padding: every row's answer starts at the last column
                    x[j, T - len(q):] = torch.tensor(q)
                    mask[j, T - len(q):] = 1
                pos = (mask.cumsum(1) - 1).clamp(min=0)
                with autocast(self.device, self.dtype):
                    logits = self.model(input_ids=x.to(self.device), attention_mask=mask.to(self.device),
                                        position_ids=pos.to(self.device)).logits[:, -1].float()
                logp = torch.log_softmax(logits, -1).cpu()
                for j, r in enumerate(chunk):
                    table = self.option_ids(tuple(r.options))
                    lps = {o: torch.logsumexp(logp[j, ids], 0).item() for o, ids in table.items()}
                    store(s + j, _soft_reply(lps))
                bar.update(len(chunk))
        finally:
            bar.close()


# --------------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP


class HTTPFeedback(Feedback):
    """An OpenAI-compatible chat-completions endpoint, through the `openai` client (see the module docstring)."""

    def __init__(self, url: str, model: str, cache: Cache | None = None, api_key_env: str = "", concurrency: int = 8,
                 timeout: float = 60.0, max_retries: int = 3, top_logprobs: int = 20):
        try:
            import openai
        except ImportError:
            raise TetherError("feedback over HTTP needs the `openai` package: pip install openai") from None
        super().__init__(cache)
        if not model:
            raise TetherError("feedback.url needs feedback.model: the model name the server expects (`tether serve` lists it at /v1/models)")
        key = "EMPTY"  # servers without authentication (tether serve, vLLM) accept any key
        if api_key_env:
            key = os.environ.get(api_key_env, "")
            if not key:
                raise TetherError(f"feedback.api_key_env names the environment variable {api_key_env}, which is not set")
        self.openai = openai
        self.client = openai.OpenAI(base_url=url, api_key=key, timeout=timeout, max_retries=max_retries)
        self.url, self.model, self.concurrency = url, model, max(1, concurrency)
        self.top_logprobs = top_logprobs
        self.identity = {"url": url.rstrip("/"), "model": model}

    def close(self) -> None:
        self.client.close()

    def _messages(self, messages):
        """A trailing assistant message is the start of the answer: ask the server to continue it (vLLM's and
        tether serve's `continue_final_message`)."""
        if messages[-1]["role"] == "assistant":
            return messages, {"continue_final_message": True, "add_generation_prompt": False}
        return messages, None

    def _call(self, **kw):
        """One request; a per-request failure becomes an error string, a run-stopping one is raised."""
        o = self.openai
        try:
            return self.client.chat.completions.create(model=self.model, **kw), ""
        except o.APITimeoutError:
            return None, f"timed out after {self.client.timeout} s ({self.client.max_retries} retries)"
        except o.APIConnectionError as e:
            raise FeedbackUnavailable(f"feedback server {self.url} cannot be reached ({e.__cause__ or e}); the answers received so "
                                      f"far are cached, so a rerun continues where this one stopped") from None
        except (o.AuthenticationError, o.PermissionDeniedError, o.NotFoundError) as e:
            raise FeedbackUnavailable(f"feedback server {self.url} refused the request: HTTP {e.status_code} "
                                      f"({_short(e.message)}); check feedback.model and feedback.api_key_env") from None
        except o.APIStatusError as e:
            return None, f"HTTP {e.status_code}: {_short(e.message)}"
        except (o.APIResponseValidationError, ValueError, KeyError, TypeError) as e:
            return None, f"malformed reply: {_short(str(e))}"

    def _run(self, requests, store, desc, one):
        bar = tqdm(total=len(requests), desc=desc, unit="req", disable=desc is None, dynamic_ncols=True)
        pool = ThreadPoolExecutor(self.concurrency)
        try:
            futures = {pool.submit(one, r): j for j, r in enumerate(requests)}
            for f in as_completed(futures):
                store(futures[f], f.result())  # a FeedbackUnavailable is raised here
                bar.update(1)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()

    def _chat(self, requests, store, desc):
        def one(r: ChatRequest) -> ChatReply:
            messages, extra = self._messages(r.messages)
            resp, err = self._call(messages=messages, max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p,
                                   seed=r.seed, extra_body=extra)
            if err:
                return ChatReply(error=err)
            try:
                choice = resp.choices[0]
                text = choice.message.content
                if not isinstance(text, str):
                    raise ValueError("the reply has no text content")
                return ChatReply(text=text.strip(), finished=choice.finish_reason != "length")
            except (AttributeError, IndexError, TypeError, ValueError) as e:
                return ChatReply(error=f"malformed reply: {_short(str(e))}")

        self._run(requests, store, desc, one)

    def _choose(self, requests, store, desc):
        def one(r: ChoiceRequest) -> ChoiceReply:
            messages, extra = self._messages(r.messages)
            resp, err = self._call(messages=messages, max_tokens=8, temperature=0.0, logprobs=True,
                                   top_logprobs=self.top_logprobs, extra_body=extra)
            if err:
                return ChoiceReply(error=err)
            try:
                choice = resp.choices[0]
                text = choice.message.content or ""
                content = getattr(choice.logprobs, "content", None) if choice.logprobs is not None else None
            except (AttributeError, IndexError, TypeError) as e:
                return ChoiceReply(error=f"malformed reply: {_short(str(e))}")
            options = tuple(r.options)
            # where the answer starts (the first token), or else the first generated token that names an option:
            # the options' log-probs among that position's alternatives
            for n, tok in enumerate(content or []):
                top = {t.token: t.logprob for t in (tok.top_logprobs or [])}
                top.setdefault(tok.token, tok.logprob)
                if (n == 0 and any(normalise_option(t) in options for t in top)) or normalise_option(tok.token) in options:
                    return _soft_reply(option_logprobs(top, options), text)
            answer = parse_option(text, options)  # no log-probs: the parsed answer, a hard label
            if answer:
                return ChoiceReply(answer=answer, kind="hard", text=text)
            return ChoiceReply(error=f"the reply names no option ({'/'.join(options)}): {_short(text)!r}", text=text)

        self._run(requests, store, desc, one)


def _short(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def make_feedback(cfg, cache_path: str | Path | None) -> Feedback:
    """The feedback model a FeedbackConfig describes, with its disk cache (`cfg.cache`, else `cache_path`)."""
    cache = Cache(cfg.cache or cache_path)
    if cfg.url:
        return HTTPFeedback(cfg.url, cfg.model, cache, cfg.api_key_env, cfg.concurrency, cfg.timeout, cfg.max_retries)
    return LocalFeedback(cfg.model, cache, cfg.dtype, cfg.batch_size, cfg.trust_remote_code)
