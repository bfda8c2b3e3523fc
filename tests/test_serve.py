"""`tether serve` over HTTP, and HTTP feedback through the `openai` client: retries, timeouts, malformed
replies, a server that dies mid-run, the disk cache, and the API key kept out of the run folder."""

import json
import time

import pytest
import torch

from conftest import free_port, start_uvicorn, write_jsonl
from tether.config import CAIReviseConfig, load_config
from tether.errors import TetherError
from tether.feedback import Cache, ChatRequest, ChoiceRequest, HTTPFeedback
from tether.stages import cai

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")


class Server:
    """`tether serve`'s app under uvicorn in a thread, with a fault injector in front of it."""

    def __init__(self, model="builtin:tiny", api_key="", port=None, **kw):
        from fastapi.responses import JSONResponse, Response

        from tether.serve import build_app

        self.app = build_app(model, api_key=api_key, dtype="fp32", **kw)
        self.faults: list[str] = []  # consumed one per request: "429", "sleep", "malformed", "die", "ok"
        self.seen = 0

        @self.app.middleware("http")
        async def inject(request, call_next):
            import asyncio

            self.seen += 1
            fault = self.faults.pop(0) if self.faults else "ok"
            if isinstance(fault, dict):  # a canned reply
                return JSONResponse(fault)
            if fault == "429":
                return JSONResponse({"error": {"message": "slow down"}}, status_code=429, headers={"retry-after-ms": "10"})
            if fault == "sleep":
                await asyncio.sleep(1.5)
            if fault == "malformed":
                return Response("{\"choices\": 7}", media_type="application/json")
            if fault == "die":
                self.server.should_exit = True
                return JSONResponse({"error": {"message": "going away"}}, status_code=503)
            return await call_next(request)

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.server, self.thread = start_uvicorn(self.app, self.port)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.stop()


def _client(server, **kw):
    return openai.OpenAI(base_url=server.url, api_key="unused", **kw)


def test_chat_completions_n_logprobs_and_models(server):
    c = _client(server)
    assert [m.id for m in c.models.list().data] == ["builtin:tiny"]
    r = c.chat.completions.create(model="builtin:tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, n=3,
                                  temperature=1.0, logprobs=True, top_logprobs=4)
    assert len(r.choices) == 3 and all(ch.finish_reason in ("stop", "length") for ch in r.choices)
    assert r.usage.completion_tokens <= 15
    ch = r.choices[0]
    lp = ch.logprobs.content
    assert 1 <= len(lp) <= 5 and all(len(t.top_logprobs) == 4 for t in lp)
    # each token's log-prob is the model's own (temperature 1) and no alternative beats the best listed
    from tether.models import load_causal_lm, load_tokenizer
    from tether.rollout import prompt_ids

    tok, model = load_tokenizer("builtin:tiny"), load_causal_lm("builtin:tiny")
    p = prompt_ids(tok, [[{"role": "user", "content": "Hi"}]])[0]
    gen = tok(ch.message.content, add_special_tokens=False)["input_ids"][:1]
    if gen and tok.decode(gen) == lp[0].token:
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([p])).logits[0, -1], -1)
        assert lp[0].logprob == pytest.approx(logp[gen[0]].item(), abs=1e-4)
        assert lp[0].top_logprobs[0].logprob == pytest.approx(logp.max().item(), abs=1e-4)


def test_bad_requests_get_400(server):
    c = _client(server, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], temperature=5)
    with pytest.raises(openai.BadRequestError, match="messages"):
        c.chat.completions.create(model="m", messages=[])
    with pytest.raises(openai.BadRequestError, match="reward model|causal LM"):
        c.post("/rewards", cast_to=object, body={"conversations": [[{"role": "user", "content": "x"}]]})


def _completion(text, logprobs=None):
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                         "logprobs": {"content": logprobs} if logprobs is not None else None}]}


def _lp(token, logprob, top):
    return {"token": token, "logprob": logprob, "bytes": None,
            "top_logprobs": [{"token": t, "logprob": v, "bytes": None} for t, v in top]}


def test_choice_over_http_soft_from_top_logprobs_hard_from_text(server):
    import math

    fb = HTTPFeedback(server.url, "builtin:tiny", Cache(None), max_retries=0)
    q = [ChoiceRequest([{"role": "user", "content": "Pick (A) or (B)."}, {"role": "assistant", "content": "The better response is ("}])]
    # the answer's first token names an option: the options' probabilities among its alternatives (' A' and 'A' summed)
    fb.cache = Cache(None)  # the same question again: not from the in-memory cache
    server.faults[:] = [_completion("B)", [_lp("B", math.log(0.5), [("B", math.log(0.5)), (" A", math.log(0.2)), ("A", math.log(0.1))])])]
    rep = fb.choose(q)[0]
    assert rep.kind == "soft" and rep.answer == "B"
    assert math.exp(rep.logprobs["A"]) == pytest.approx(0.3) and math.exp(rep.logprobs["B"]) == pytest.approx(0.5)
    # the first option-naming token comes after other tokens
    fb.cache = Cache(None)  # the same question again: not from the in-memory cache
    server.faults[:] = [_completion(" (A)", [_lp(" (", -0.1, [(" (", -0.1)]), _lp("A", math.log(0.6), [("A", math.log(0.6)), ("B", math.log(0.3))])])]
    rep = fb.choose(q)[0]
    assert rep.kind == "soft" and math.exp(rep.logprobs["B"]) == pytest.approx(0.3)
    # no log-probs from the server: the parsed answer, recorded as a hard label
    fb.cache = Cache(None)  # the same question again: not from the in-memory cache
    server.faults[:] = [_completion("I would say Response B is better.")]
    rep = fb.choose(q)[0]
    assert (rep.kind, rep.answer, rep.logprobs) == ("hard", "B", {})
    # neither: a failure, never a label
    fb.cache = Cache(None)  # the same question again: not from the in-memory cache
    server.faults[:] = [_completion("Both are fine.")]
    rep = fb.choose(q)[0]
    assert rep.error.startswith("the reply names no option") and rep.answer == ""
    # the real server continues the answer's start (continue_final_message) and answers
    fb.cache = Cache(None)
    rep = fb.choose(q)[0]
    assert rep.kind in ("soft", "hard") or rep.error.startswith("the reply names no option")


def test_429_then_success_is_retried(server):
    fb = HTTPFeedback(server.url, "builtin:tiny", Cache(None), max_retries=2)
    server.faults[:] = ["429"]
    before = server.seen
    rep = fb.chat([ChatRequest([{"role": "user", "content": "hello"}], max_tokens=4)])[0]
    assert not rep.error and fb.failures == []
    assert server.seen - before == 2  # the 429 and the retry


def test_timeout_is_a_recorded_failure_not_an_answer(server):
    fb = HTTPFeedback(server.url, "builtin:tiny", Cache(None), timeout=0.3, max_retries=0)
    server.faults[:] = ["sleep"]
    rep = fb.chat([ChatRequest([{"role": "user", "content": "hello"}], max_tokens=4)])[0]
    assert rep.error.startswith("timed out") and rep.text == ""
    assert len(fb.failures) == 1 and fb.cache.data == {}  # a failure is never cached
    time.sleep(1.3)  # let the slow request finish before the next test


def test_malformed_reply_is_a_recorded_failure(server):
    fb = HTTPFeedback(server.url, "builtin:tiny", Cache(None), max_retries=0)
    server.faults[:] = ["malformed", "malformed"]
    rep = fb.chat([ChatRequest([{"role": "user", "content": "hello"}], max_tokens=4)])[0]
    assert rep.error.startswith("malformed reply")
    choice = fb.choose([ChoiceRequest([{"role": "user", "content": "A or B?"}])])[0]
    assert choice.error.startswith("malformed reply") and choice.answer == ""


def _revise_cfg(tmp_path, url, out="rev", n=4, **kw):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Question {i}?"} for i in range(n)])
    base = {"data.path": str(prompts), "out": str(tmp_path / out), "feedback.url": url, "feedback.model": "builtin:tiny",
            "rounds": 1, "sample.max_new_tokens": 4, "sample.critique_max_new_tokens": 4}
    return load_config(CAIReviseConfig, None, {**base, **kw})


def test_cai_over_http_cache_and_api_key(tmp_path, monkeypatch):
    secret = "sk-test-do-not-leak-4242"
    monkeypatch.setenv("TETHER_TEST_KEY", secret)
    srv = Server(api_key=secret)
    try:
        cfg = _revise_cfg(tmp_path, srv.url, **{"feedback.api_key_env": "TETHER_TEST_KEY", "feedback.concurrency": 4})
        s = cai.revise(cfg)
        assert s["feedback_failures"] == 0 and s["chains"] == 4
        asked = s["cache"]["misses"]
        assert asked >= 8 and srv.seen == asked  # 4 responses, 4 critiques, and a revision per non-empty critique
        chains = (tmp_path / "rev" / "chains.jsonl").read_text()
        s2 = cai.revise(cfg)  # the same run again: every answer from the disk cache, nothing sent
        assert srv.seen == asked and s2["cache"] == {"hits": asked, "misses": 0}
        assert (tmp_path / "rev" / "chains.jsonl").read_text() == chains
        for f in (tmp_path / "rev").rglob("*"):
            if f.is_file():
                assert secret not in f.read_text(errors="replace"), f
        # a wrong key is refused at once, with a clear error
        monkeypatch.setenv("TETHER_TEST_KEY", "wrong")
        bad = _revise_cfg(tmp_path, srv.url, out="bad", **{"feedback.api_key_env": "TETHER_TEST_KEY"})
        with pytest.raises(TetherError, match="refused the request: HTTP 401"):
            cai.revise(bad)
        monkeypatch.delenv("TETHER_TEST_KEY")
        with pytest.raises(TetherError, match="TETHER_TEST_KEY, which is not set"):
            cai.revise(bad)
    finally:
        srv.stop()


def test_server_dying_mid_run_stops_with_a_clear_error_and_keeps_the_cache(tmp_path):
    srv = Server()
    cfg = _revise_cfg(tmp_path, srv.url, n=6, **{"feedback.concurrency": 1, "feedback.max_retries": 1, "feedback.timeout": 5})
    srv.faults[:] = ["ok"] * 5 + ["die"]
    with pytest.raises(TetherError, match="cannot be reached.*cached, so a rerun continues"):
        cai.revise(cfg)
    srv.thread.join(timeout=10)
    cached = (tmp_path / "rev" / "feedback-cache.jsonl").read_text().splitlines()
    assert len(cached) == 5 and all(json.loads(line)["key"] for line in cached)
    assert not (tmp_path / "rev" / "summary.json").exists()  # not a finished run
    srv2 = Server(port=srv.port)  # the server back at the same address: the rerun sends only what was not answered
    try:
        s = cai.revise(cfg)
        assert s["cache"]["hits"] == 5 and srv2.seen == s["cache"]["misses"] >= 7
    finally:
        srv2.stop()


def test_rewards_endpoint_matches_local_scores(tmp_path):
    from transformers import LlamaForSequenceClassification

    from tether.models import load_reward_model, load_tokenizer, score_conversations, tiny_config

    cfg = tiny_config()
    cfg.num_labels = 1
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(cfg)
    tok = load_tokenizer("builtin:tiny")
    rm.config.pad_token_id = tok.pad_token_id
    rm.config.tether_reward_mean, rm.config.tether_reward_std = 0.25, 2.0
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    srv = Server(model=str(tmp_path / "rm"))
    try:
        convs = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                 [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]]
        c = _client(srv)
        r = c.post("/rewards", cast_to=object, body={"conversations": convs})
        model, rtok = load_reward_model(str(tmp_path / "rm"))
        want = score_conversations(model.eval(), rtok, convs, torch.device("cpu"), torch.float32)
        assert r["rewards"] == pytest.approx(want.tolist(), abs=1e-4)
        assert r["normalizer"] == [{"mean": 0.25, "std": 2.0}]
        with pytest.raises(openai.BadRequestError, match="reward model"):
            _client(srv, max_retries=0).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    finally:
        srv.stop()


def test_ppo_with_a_served_reward_model_equals_the_local_one(tmp_path):
    """reward.url (a reward model behind `tether serve`) trains the same policy as reward.model (the same folder)."""
    from safetensors.torch import load_file

    from tether.config import PPOConfig
    from tether.models import load_reward_model, save_pretrained
    from tether.stages import ppo

    rm, rtok = load_reward_model("builtin:tiny")
    rm.config.tether_reward_mean, rm.config.tether_reward_std = 0.1, 0.5
    folder = str(save_pretrained(rm, rtok, tmp_path / "rm"))
    srv = Server(model=folder)
    try:
        def run(name, **reward):
            base = {"model.name": "builtin:tiny", "model.dtype": "fp32", "model.lora_r": 4, "task.name": "test_tasks:EchoTask",
                    "train.out": str(tmp_path / name), "train.report_to": "none", "train.max_steps": 2, "train.lr": 3e-3,
                    "train.save_every": 0, "rollout.prompts_per_step": 4, "rollout.max_new_tokens": 8, "ppo.minibatch_size": 4,
                    "eval_prompts": 0, "reward.score_truncated": True, "ppo.critic_init": "policy", **reward}
            s = ppo.train(load_config(PPOConfig, None, base))
            return s, load_file(str(tmp_path / name / "model" / "model.safetensors"))

        s_local, w_local = run("local", **{"reward.model": folder})
        s_http, w_http = run("http", **{"reward.url": srv.url})
        assert srv.seen >= 3  # the probe and one request per iteration
        for k in w_local:
            assert torch.allclose(w_local[k], w_http[k], atol=1e-5), k
        with pytest.raises(TetherError, match="both name a reward model"):
            run("both", **{"reward.model": folder, "reward.url": srv.url})
    finally:
        srv.stop()
    with pytest.raises(TetherError, match="cannot be reached"):
        from tether.models import RemoteRewardModel

        RemoteRewardModel(srv.url, max_retries=0)


def test_tether_serve_command_binds_to_loopback_and_answers(tmp_path):
    """The real command, as a user starts it: `tether serve builtin:tiny --port P`, then SIGINT."""
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TETHER_TEST_KEY": "sk-cli-secret"}
    proc = subprocess.Popen([sys.executable, "-m", "tether", "serve", "builtin:tiny", "--port", str(port), "--api-key-env",
                             "TETHER_TEST_KEY", "--dtype", "fp32"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        body = None
        for _ in range(240):
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer sk-cli-secret"})
                body = json.loads(urllib.request.urlopen(req, timeout=1).read())
                break
            except OSError:
                time.sleep(0.25)
        assert body and body["data"][0]["id"] == "builtin:tiny"
        with pytest.raises(urllib.error.HTTPError) as e:  # no key: 401
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
        assert e.value.code == 401
        conns = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout if \
            subprocess.run(["which", "ss"], capture_output=True).returncode == 0 else ""
        if conns:  # the listening socket's local address
            assert conns.split()[3] == f"127.0.0.1:{port}", conns
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=20)[0].decode()
    assert "sk-cli-secret" not in out


def test_concurrent_requests_are_batched_through_the_engine():
    from concurrent.futures import ThreadPoolExecutor

    srv = Server(batch_wait_ms=300)
    try:
        c = _client(srv)
        batcher = srv.app.state.batcher
        before = batcher.batches
        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda i: c.chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=4, temperature=0), range(8)))
        assert len(outs) == 8 and all(o.choices[0].message.content is not None for o in outs)
        assert batcher.batches - before <= 3  # 8 requests, not 8 engine calls
    finally:
        srv.stop()
