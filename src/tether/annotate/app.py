"""`tether annotate serve`: the preference-collection web app (FastAPI, server-rendered HTML, plain JavaScript).

Annotators sign in with their token (`/?token=...` once: it becomes an HttpOnly, SameSite=Strict cookie;
API clients send `Authorization: Bearer TOKEN` instead). The page shows the prompt as a conversation and
the two responses side by side (left/right drawn per assignment and recorded); A better / B better /
tie / both bad, a strength 1-4, an optional reason, skip, undo; keyboard: 1-4 choose, s skip, u undo.
Every text is put into the page as text (`textContent`, never as HTML): markdown, code and `<script>`
in a response show as written.

JSON API (what the page calls):  GET /api/next   POST /api/answer {assignment, choice, strength, reason}
                                  POST /api/skip {assignment}   POST /api/undo
Admin (bearer admin token):       GET /api/admin/status   GET /api/admin/agreement   GET /admin

Safety: a form-style request authenticated by the cookie must carry the page's CSRF token in
`X-CSRF-Token` (an HMAC of the annotator's token); bodies over 64 KiB are refused; tokens are compared
by their SHA-256 (the database stores only hashes) and the admin token in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import secrets

from tether.annotate.export import agreement_report
from tether.annotate.store import Store

try:  # at module level: FastAPI resolves the endpoints' annotations in this module's namespace
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
except ImportError:  # pragma: no cover
    FastAPI = Request = None

MAX_BODY = 64 * 1024
COOKIE = "tether_annotator"


def _json_error(status: int, message: str):
    return JSONResponse({"error": message}, status_code=status)


def build_app(store: Store, *, overlap: int = 2, gold_rate: float = 0.0, admin_token: str = "", guidelines: str = ""):
    if FastAPI is None:
        from tether.errors import TetherError

        raise TetherError("tether annotate serve needs fastapi and uvicorn: pip install fastapi uvicorn")
    app = FastAPI(title="tether annotate", docs_url=None, redoc_url=None, openapi_url=None)
    secret = secrets.token_bytes(32)  # per server process: CSRF tokens are valid while it runs

    def csrf_for(token: str) -> str:
        return hmac.new(secret, hashlib.sha256(token.encode()).digest(), "sha256").hexdigest()

    def who(request: Request, need_csrf: bool) -> tuple[dict | None, str]:
        """(annotator, error): from the bearer token, or from the cookie (then a CSRF header is required)."""
        auth = request.headers.get("authorization", "")
        if auth.startswith("Bearer "):
            a = store.annotator_for(auth[7:].strip())
            return (a, "") if a else (None, "missing or wrong token")
        token = request.cookies.get(COOKIE, "")
        a = store.annotator_for(token)
        if a is None:
            return None, "missing or wrong token"
        if need_csrf and not hmac.compare_digest(request.headers.get("x-csrf-token", ""), csrf_for(token)):
            return None, "csrf"
        return a, ""

    @app.middleware("http")
    async def limits(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return _json_error(413, f"request body over {MAX_BODY} bytes")
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Content-Security-Policy"] = "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'"
        return response

    async def body(request: Request) -> dict:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise ValueError("request body too large")
        try:
            data = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError("the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ValueError("the body must be a JSON object")
        return data

    def auth_or_error(request: Request, need_csrf: bool):
        a, err = who(request, need_csrf)
        if a is None:
            return None, _json_error(403 if err == "csrf" else 401, "CSRF token missing or wrong" if err == "csrf" else err)
        return a, None

    @app.get("/", response_class=HTMLResponse)
    def page(request: Request, token: str = ""):
        if token:  # the sign-in link: the token moves into a cookie and out of the URL
            if store.annotator_for(token) is None:
                return HTMLResponse("<h1>Unknown token</h1>", status_code=401)
            r = RedirectResponse("/", status_code=303)
            r.set_cookie(COOKIE, token, httponly=True, samesite="strict")
            return r
        a, _ = who(request, need_csrf=False)
        if a is None:
            return HTMLResponse("<h1>Sign in with the link you were given (/?token=...)</h1>", status_code=401)
        return HTMLResponse(_PAGE.replace("{{name}}", html.escape(a["name"])).replace("{{csrf}}", csrf_for(request.cookies[COOKIE]))
                            .replace("{{guidelines}}", html.escape(guidelines or "Pick the better response. Ties and 'both bad' are fine.")))

    @app.get("/api/next")
    def next_pair(request: Request):
        a, err = auth_or_error(request, need_csrf=False)
        if err:
            return err
        x = store.next_assignment(a["id"], overlap=overlap, gold_rate=gold_rate)
        return {"done": True} if x is None else {"done": False, **x}

    @app.post("/api/answer")
    async def answer(request: Request):
        a, err = auth_or_error(request, need_csrf=True)
        if err:
            return err
        try:
            b = await body(request)
            aid = b.get("assignment")
            if not isinstance(aid, int) or isinstance(aid, bool):
                raise ValueError("'assignment' must be an integer")
            return store.answer(a["id"], aid, str(b.get("choice", "")), b.get("strength", 2), str(b.get("reason", "")))
        except PermissionError as e:
            return _json_error(403, str(e))
        except ValueError as e:
            return _json_error(409 if "answered already" in str(e) else 400, str(e))

    @app.post("/api/skip")
    async def skip(request: Request):
        a, err = auth_or_error(request, need_csrf=True)
        if err:
            return err
        try:
            b = await body(request)
            store.skip(a["id"], int(b.get("assignment", -1)))
            return {"skipped": b["assignment"]}
        except PermissionError as e:
            return _json_error(403, str(e))
        except (ValueError, TypeError) as e:
            return _json_error(400, str(e))

    @app.post("/api/undo")
    def undo(request: Request):
        a, err = auth_or_error(request, need_csrf=True)
        if err:
            return err
        return {"undone": store.undo(a["id"])}

    def is_admin(request: Request) -> bool:
        given = request.headers.get("authorization", "")[7:] or request.query_params.get("token", "")
        return bool(admin_token) and hmac.compare_digest(given.encode(), admin_token.encode())

    @app.get("/api/admin/status")
    def status(request: Request):
        return store.progress() if is_admin(request) else _json_error(401, "admin token required")

    @app.get("/api/admin/agreement")
    def agreement(request: Request):
        return agreement_report(store) if is_admin(request) else _json_error(401, "admin token required")

    @app.get("/admin", response_class=HTMLResponse)
    def admin(request: Request):
        if not is_admin(request):
            return HTMLResponse("<h1>Admin token required</h1>", status_code=401)
        p, ag = store.progress(), agreement_report(store)
        rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{s['answers']}</td><td>{s['skipped']}</td>"
                       f"<td>{_fmt(ag['annotators'].get(n, {}).get('agreement_with_majority'))}</td>"
                       f"<td>{_fmt(ag['annotators'].get(n, {}).get('gold_accuracy'))}</td>"
                       f"<td>{_fmt(ag['annotators'].get(n, {}).get('picked_left'))}</td></tr>" for n, s in p["annotators"].items())
        head = (f"<p>{p['answers']} answers on {p['pairs']} pairs. Raw agreement {_fmt(ag.get('raw_agreement'))}, "
                f"Cohen's kappa {_fmt(ag.get('cohen_kappa_pairwise'))}, Krippendorff's alpha {_fmt(ag.get('krippendorff_alpha'))}</p>"
                + "".join(f"<p>kappa {html.escape(k['annotators'][0])} / {html.escape(k['annotators'][1])}: {_fmt(k['kappa'])} "
                          f"on {k['items']} pairs</p>" for k in ag.get("kappa_by_pair", [])))
        return HTMLResponse(f"<!doctype html><meta charset=utf-8><title>tether annotate: admin</title><h1>Progress</h1>{head}"
                            "<table border=1 cellpadding=4><tr><th>annotator</th><th>answers</th><th>skipped</th>"
                            f"<th>with majority</th><th>gold accuracy</th><th>picked left</th></tr>{rows}</table>")

    return app


def _fmt(x) -> str:
    return "-" if x is None or x != x else f"{x:.3f}"


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tether annotate</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5rem;max-width:78rem}
.turn{white-space:pre-wrap;border-left:3px solid #999;padding:.3rem .6rem;margin:.4rem 0}
.cols{display:flex;gap:1rem}.col{flex:1;border:1px solid #bbb;border-radius:6px;padding:.6rem;white-space:pre-wrap}
button{margin:.2rem;padding:.4rem .8rem}#status{color:#555}
</style></head><body>
<h1>Which response is better?</h1>
<p>Signed in as <b>{{name}}</b>. <span id="status"></span></p>
<details><summary>Guidelines</summary><p class="turn">{{guidelines}}</p></details>
<div id="prompt"></div>
<div class="cols"><div><h3>A (left)</h3><div class="col" id="left"></div></div>
<div><h3>B (right)</h3><div class="col" id="right"></div></div></div>
<p>Strength: <select id="strength"><option>1</option><option selected>2</option><option>3</option><option>4</option></select>
Reason (optional): <input id="reason" size="50"></p>
<p><button data-c="left">1: A better</button><button data-c="right">2: B better</button>
<button data-c="tie">3: tie</button><button data-c="both_bad">4: both bad</button>
<button id="skip">s: skip</button><button id="undo">u: undo</button></p>
<script>
const CSRF = "{{csrf}}"; let current = null, done = 0;
async function api(path, body) {
  const r = await fetch(path, body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json",
    "X-CSRF-Token": CSRF}, body: JSON.stringify(body)});
  const j = await r.json(); if (!r.ok) throw new Error(j.error || r.status); return j;
}
function show(x) {
  const p = document.getElementById("prompt"); p.replaceChildren();
  if (x.done) { current = null; document.getElementById("left").textContent = "";
    document.getElementById("right").textContent = ""; setStatus("Nothing left to label. Thank you!"); return; }
  current = x;
  for (const m of x.prompt) { const d = document.createElement("div"); d.className = "turn";
    d.textContent = m.role + ": " + m.content; p.appendChild(d); }
  document.getElementById("left").textContent = x.left;      // text, never HTML
  document.getElementById("right").textContent = x.right;
  setStatus(done + " answered this session");
}
function setStatus(t) { document.getElementById("status").textContent = t; }
async function next() { try { show(await api("/api/next")); } catch (e) { setStatus("error: " + e.message); } }
async function choose(c) {
  if (!current) return;
  try { await api("/api/answer", {assignment: current.assignment, choice: c,
          strength: parseInt(document.getElementById("strength").value), reason: document.getElementById("reason").value});
        done++; document.getElementById("reason").value = ""; await next(); } catch (e) { setStatus("error: " + e.message); }
}
async function skip() { if (current) { try { await api("/api/skip", {assignment: current.assignment}); await next(); }
  catch (e) { setStatus("error: " + e.message); } } }
async function undo() { try { await api("/api/undo", {}); done = Math.max(0, done - 1); await next(); }
  catch (e) { setStatus("error: " + e.message); } }
document.querySelectorAll("button[data-c]").forEach(b => b.onclick = () => choose(b.dataset.c));
document.getElementById("skip").onclick = skip; document.getElementById("undo").onclick = undo;
document.addEventListener("keydown", e => {
  if (e.target.tagName === "INPUT") return;
  const keys = {"1": "left", "2": "right", "3": "tie", "4": "both_bad"};
  if (keys[e.key]) choose(keys[e.key]); else if (e.key === "s") skip(); else if (e.key === "u") undo();
});
next();
</script></body></html>
"""
