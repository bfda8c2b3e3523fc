"""`tether serve MODEL`: an OpenAI-compatible server for any causal LM tether loads, or a reward model.

    tether serve builtin:smollm2-135m-instruct            # http://127.0.0.1:8000/v1
    tether serve runs/quickstart/rm/model --port 8001     # a reward model (or an ensemble folder)

Causal LM: `GET /v1/models`, `POST /v1/chat/completions` (messages, temperature, top_p, max_tokens or
max_completion_tokens, n, stop, logprobs / top_logprobs, seed; `continue_final_message` continues a
trailing assistant message, as vLLM does). Generation stops at EOS or max_tokens. Requests that arrive
together are batched into one call of the rollout engine (tether.engine): a worker thread collects
what is waiting for up to `--batch-wait-ms` and samples it in one batch per sampling setting.

Reward model: `POST /v1/rewards` with {"conversations": [[{"role": ..., "content": ...}, ...], ...]}
returns {"rewards": [...]} (the raw scalar of each conversation; for an ensemble, the members' mean),
"members" (each member's scores) and "normalizer" (each member's stored mean and std), which is what
PPO's `reward.url` reads.

Bound to 127.0.0.1 unless `--host` says otherwise. With `--api-key-env NAME` every request must carry
`Authorization: Bearer <the value of $NAME>` (compared in constant time).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from tether.errors import TetherError

try:  # at module level: FastAPI resolves the endpoints' (string) annotations in this module's namespace
    from fastapi import FastAPI, Request
except ImportError:  # pragma: no cover  (build_app says what to install)
    FastAPI = Request = None

log = logging.getLogger("tether")
MAX_BODY_BYTES = 8 * 1024 * 1024


@dataclass
class _Job:
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    future: Future = field(default_factory=Future)


class Batcher:
    """Collects generation jobs from many request threads and runs them through the engine in batches."""

    def __init__(self, engine, max_batch: int = 64, wait_s: float = 0.005):
        self.engine, self.max_batch, self.wait_s = engine, max_batch, wait_s
        self.q: queue.Queue = queue.Queue()
        self.batches = 0
        self._thread = threading.Thread(target=self._loop, daemon=True, name="tether-batcher")
        self._thread.start()

    def submit(self, jobs: list[_Job]) -> list:
        for j in jobs:
            self.q.put(j)
        return [j.future.result() for j in jobs]

    def _loop(self) -> None:
        while True:
            jobs = [self.q.get()]
            deadline = time.monotonic() + self.wait_s
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self.q.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            groups: dict[tuple, list[_Job]] = {}
            for j in jobs:
                groups.setdefault((j.max_tokens, j.temperature, j.top_p), []).append(j)
            for (max_tokens, temperature, top_p), js in groups.items():
                try:
                    out = self.engine.generate([j.prompt for j in js], max_tokens, temperature, top_p, batch_size=len(js))
                    self.batches += 1
                    for j, ids, fin in zip(js, out.response_ids, out.finished):
                        j.future.set_result((ids, fin))
                except Exception as e:  # noqa: BLE001  (the error goes back to each waiting request)
                    for j in js:
                        j.future.set_exception(e)


def _error(status: int, message: str, kind: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"messages[{i}] needs a role of system, user, assistant or tool")
        content = m.get("content")
        if isinstance(content, list):  # the content-parts form: text parts only
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        out.append({"role": m["role"], "content": content})
    return out


def _number(body: dict, key: str, default, lo, hi, kind=float):
    v = body.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and int(v) != v) or not lo <= v <= hi:
        raise ValueError(f"'{key}' must be a number in [{lo}, {hi}], got {v!r}")
    return kind(v)


def build_app(model: str, *, api_key: str = "", dtype: str = "auto", max_batch: int = 64, batch_wait_ms: float = 5.0,
              trust_remote_code: bool = False, name: str | None = None):
    """The FastAPI app serving `model` (a causal LM, or a reward model / ensemble folder)."""
    if FastAPI is None:
        raise TetherError("tether serve needs fastapi and uvicorn: pip install fastapi uvicorn")
    from tether.models import default_device, is_reward_ensemble, is_sequence_classifier, resolve_dtype

    device = default_device()
    dt = resolve_dtype(dtype, device)
    served = name or model
    is_rm = is_reward_ensemble(model) or is_sequence_classifier(model)
    app = FastAPI(title="tether serve", docs_url=None, redoc_url=None, openapi_url=None)

    if is_rm:
        from tether.models import load_reward_ensemble, reward_normaliser, score_conversations

        members, rm_tok = load_reward_ensemble(model, trust_remote_code)
        for m in members:
            m.to(device).eval().requires_grad_(False)
        stats = [reward_normaliser(m) for m in members]
    else:
        from tether.engine import Engine
        from tether.models import load_causal_lm, load_tokenizer

        tok = load_tokenizer(model, trust_remote_code)
        lm = load_causal_lm(model, trust_remote_code).to(device).eval()
        lm.requires_grad_(False)
        batcher = Batcher(Engine(lm, tok, dt), max_batch=max_batch, wait_s=batch_wait_ms / 1000)
        app.state.batcher = batcher

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return _error(413, f"request body over {MAX_BODY_BYTES} bytes")
        return await call_next(request)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": served, "object": "model", "created": 0, "owned_by": "tether",
                                            "kind": "reward-model" if is_rm else "causal-lm"}]}

    @app.get("/health")
    def health():
        return {"status": "ok"}

    async def _body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError("the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        return body

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        import anyio

        if is_rm:
            return _error(400, f"{served} is a reward model: POST /v1/rewards")
        try:
            body = await _body(request)
            if body.get("stream"):
                raise ValueError("stream=true is not supported")
            msgs = _messages(body)
            temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
            top_p = _number(body, "top_p", 1.0, 1e-6, 1.0)
            max_tokens = _number(body, "max_completion_tokens", None, 1, 4096, int) if body.get("max_completion_tokens") is not None \
                else _number(body, "max_tokens", 256, 1, 4096, int)
            n = _number(body, "n", 1, 1, 16, int)
            want_lp = bool(body.get("logprobs"))
            top_k = _number(body, "top_logprobs", 0, 0, 20, int)
            if top_k and not want_lp:
                raise ValueError("top_logprobs needs logprobs=true")
            stop = body.get("stop") or []
            stop = [stop] if isinstance(stop, str) else stop
            if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
                raise ValueError("'stop' must be a string or a list of up to 4 non-empty strings")
            cont = bool(body.get("continue_final_message"))
            if cont and msgs[-1]["role"] != "assistant":
                raise ValueError("continue_final_message needs the last message to be the assistant's")
        except ValueError as e:
            return _error(400, str(e))
        from tether.data import render
        from tether.rollout import prompt_ids

        # `seed` is accepted and not honoured: requests batched together share one random stream
        if cont:  # the last (assistant) message is the start of the answer
            prompt = prompt_ids(tok, [msgs])[0]
        else:  # a new assistant turn, even after an assistant message
            prompt = tok(render(tok, msgs, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        jobs = [_Job(prompt, max_tokens, temperature, top_p) for _ in range(n)]
        results = await anyio.to_thread.run_sync(batcher.submit, jobs)
        choices, completion_tokens = [], 0
        for i, (ids, fin) in enumerate(results):
            completion_tokens += len(ids)
            gen = ids[:-1] if fin else ids
            text = tok.decode(gen, skip_special_tokens=True)
            finish = "stop" if fin else "length"
            for s in stop:
                if s in text:
                    text, finish = text[: text.index(s)], "stop"
            choice = {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}
            if want_lp:
                choice["logprobs"] = {"content": await anyio.to_thread.run_sync(_logprobs, lm, tok, prompt, gen, top_k, device, dt)}
            choices.append(choice)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": served, "choices": choices,
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
                          "total_tokens": len(prompt) + completion_tokens}}

    @app.post("/v1/rewards")
    async def rewards(request: Request):
        import anyio

        if not is_rm:
            return _error(400, f"{served} is a causal LM, not a reward model: POST /v1/chat/completions")
        try:
            body = await _body(request)
            convs = body.get("conversations")
            if not isinstance(convs, list) or not convs:
                raise ValueError("'conversations' must be a non-empty list of message lists")
            convs = [_messages({"messages": c}) for c in convs]
        except ValueError as e:
            return _error(400, str(e))

        def score():
            with torch.no_grad():
                return score_conversations(members, rm_tok, convs, device, dt, batch_size=16)

        raw = await anyio.to_thread.run_sync(score)  # (members, N)
        return {"object": "rewards", "model": served, "rewards": raw.mean(0).tolist(), "members": raw.tolist(),
                "normalizer": [{"mean": m, "std": s} for m, s in stats]}

    return app


@torch.no_grad()
def _logprobs(lm, tok, prompt: list[int], gen: list[int], top_k: int, device, dtype) -> list[dict]:
    """OpenAI's logprobs.content for generated tokens `gen`: each token's log-prob under the model (at
    temperature 1) and the `top_k` most likely alternatives, from one teacher-forced forward."""
    from tether.models import autocast

    if not gen:
        return []
    x = torch.tensor([prompt + gen], device=device)
    with autocast(device, dtype):
        logits = lm(input_ids=x).logits[0, len(prompt) - 1 : -1].float()
    logp = torch.log_softmax(logits, -1).cpu()
    out = []
    for t, tid in enumerate(gen):
        entry = {"token": tok.decode([tid]), "logprob": logp[t, tid].item(), "bytes": list(tok.decode([tid]).encode())}
        if top_k:
            vals, idx = logp[t].topk(top_k)
            entry["top_logprobs"] = [{"token": tok.decode([i]), "logprob": v, "bytes": list(tok.decode([i]).encode())}
                                     for v, i in zip(vals.tolist(), idx.tolist())]
        else:
            entry["top_logprobs"] = []
        out.append(entry)
    return out


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, api_key_env: str = "", **kw) -> None:
    """Run the server until interrupted (uvicorn)."""
    try:
        import uvicorn
    except ImportError:
        raise TetherError("tether serve needs fastapi and uvicorn: pip install fastapi uvicorn") from None
    key = ""
    if api_key_env:
        key = os.environ.get(api_key_env, "")
        if not key:
            raise TetherError(f"--api-key-env names {api_key_env}, which is not set")
    app = build_app(model, api_key=key, **kw)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("tether serve: listening on %s, reachable from other machines%s", host,
                    "" if key else " with no API key (--api-key-env)")
    log.info("tether serve: %s at http://%s:%d/v1", model, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")
