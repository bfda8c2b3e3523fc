"""`tether annotate serve` over HTTP: two annotators, tokens, CSRF, text never rendered as HTML, admin, export."""

import http.client
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("sqlalchemy")
pytest.importorskip("uvicorn")
from conftest import free_port, new_store, start_uvicorn  # noqa: E402
from tether.annotate.app import build_app  # noqa: E402
from tether.annotate.export import preference_rows  # noqa: E402
from tether.annotate.store import Store  # noqa: E402

XSS = "<script>document.title='pwned'</script><b>bold?</b> **markdown** `code`"


class App:
    def __init__(self, store, **kw):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.server, self.thread = start_uvicorn(build_app(store, **kw), self.port)

    def call(self, path, body=None, token=None, headers=None):
        h = {"Content-Type": "application/json", **(headers or {})}
        if token:
            h["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.base + path, data=None if body is None else json.dumps(body).encode(), headers=h,
                                     method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(params=["sqlite", "postgresql"])
def setup(request, tmp_path):
    """The API tests on SQLite and on PostgreSQL."""
    store = new_store(request, tmp_path)
    items = [{"prompt": [{"role": "user", "content": f"Q{i}?"}], "a": f"answer a{i}", "b": f"answer b{i}"} for i in range(3)]
    items.append({"prompt": [{"role": "user", "content": "Q3?"}], "a": XSS, "b": "plain"})
    store.add_pairs(items)
    tokens = {n: store.add_annotator(n) for n in ("ann", "bob")}
    app = App(store, overlap=2, admin_token="admin-secret")
    yield store, tokens, app
    app.stop()


def _pick(x, want):
    """The left/right choice that means response `want` ('a' or 'b') for this assignment."""
    left_is_a = x["left"].startswith("answer a") or x["left"] == XSS
    return "left" if (want == "a") == left_is_a else "right"


def test_two_annotators_over_http_and_export(setup):
    store, tokens, app = setup
    plan = {"ann": {"Q0?": "a", "Q1?": "a", "Q2?": "b", "Q3?": "b"}, "bob": {"Q0?": "a", "Q1?": "b", "Q2?": "b", "Q3?": "b"}}
    for name in ("ann", "bob"):
        while True:
            status, x = app.call("/api/next", token=tokens[name])
            assert status == 200
            if x["done"]:
                break
            status, r = app.call("/api/answer", {"assignment": x["assignment"], "choice": _pick(x, plan[name][x["prompt"][0]["content"]]),
                                                 "strength": 3}, token=tokens[name])
            assert status == 200, r
    rows = {r["prompt"][0]["content"]: r for r in preference_rows(store)}
    assert set(rows) == {"Q0?", "Q2?", "Q3?"}  # Q1 split 1-1: dropped without ties
    assert rows["Q0?"]["votes"] == {"ann": 1.0, "bob": 1.0} and rows["Q0?"]["p_chosen"] == 1.0
    assert rows["Q2?"]["chosen"] == "answer b2"
    status, s = app.call("/api/admin/status", token="admin-secret")
    assert status == 200 and s["answers"] == 8 and s["annotators"]["ann"]["answers"] == 4
    status, a = app.call("/api/admin/agreement", token="admin-secret")
    assert status == 200 and a["annotators"]["bob"]["answers"] == 4


def test_tokens_and_ownership(setup):
    store, tokens, app = setup
    assert app.call("/api/next")[0] == 401
    assert app.call("/api/next", token="wrong")[0] == 401
    _, x = app.call("/api/next", token=tokens["ann"])
    status, r = app.call("/api/answer", {"assignment": x["assignment"], "choice": "left"}, token=tokens["bob"])
    assert status == 403  # bob cannot answer ann's assignment
    assert app.call("/api/answer", {"assignment": x["assignment"], "choice": "sideways"}, token=tokens["ann"])[0] == 400
    assert app.call("/api/answer", {"assignment": x["assignment"], "choice": "left"}, token=tokens["ann"])[0] == 200
    assert app.call("/api/answer", {"assignment": x["assignment"], "choice": "left"}, token=tokens["ann"])[0] == 409
    assert app.call("/api/undo", {}, token=tokens["bob"])[1] == {"undone": None}  # bob's undo touches nothing of ann's
    assert app.call("/api/undo", {}, token=tokens["ann"])[1] == {"undone": x["assignment"]}
    assert app.call("/api/admin/status")[0] == 401 and app.call("/api/admin/status", token=tokens["ann"])[0] == 401
    big = {"assignment": 1, "choice": "left", "reason": "x" * 70000}
    assert app.call("/api/answer", big, token=tokens["ann"])[0] == 413


def test_cookie_sign_in_needs_the_csrf_token_and_the_page_escapes(setup, tmp_path):
    store, tokens, app = setup
    weird = store.add_annotator("<i>eve</i>")
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    page = opener.open(f"{app.base}/?token={weird}", timeout=10).read().decode()  # 303 -> / with the cookie set
    assert "&lt;i&gt;eve&lt;/i&gt;" in page and "<i>eve</i>" not in page
    assert XSS not in page  # responses never enter the HTML; the script puts them in with textContent
    csrf = page.split('const CSRF = "')[1].split('"')[0]
    x = json.loads(opener.open(f"{app.base}/api/next", timeout=10).read())
    req = urllib.request.Request(f"{app.base}/api/answer", data=json.dumps({"assignment": x["assignment"], "choice": "tie"}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        opener.open(req, timeout=10)
    assert e.value.code == 403  # a cookie alone does not post: a cross-site form would carry it too
    req.add_header("X-CSRF-Token", csrf)
    assert opener.open(req, timeout=10).status == 200


def test_a_script_in_a_response_is_shown_as_text_in_chromium(setup, tmp_path):
    """Headless Chromium signs in with the link, the page fetches the pair with the <script> response and shows it."""
    path = "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else shutil.which("chromium")
    if not path:
        pytest.fail("headless Chromium is needed: `apt-get install -y chromium` as root (or `make browser`)")
    store, tokens, app = setup
    token = store.add_annotator("browser")
    i = store.annotator_for(token)["id"]
    while (x := store.next_assignment(i, overlap=3)) is not None and XSS not in (x["left"], x["right"]):
        store.answer(i, x["assignment"], "tie")  # answer until the pair with the script is the open one
    cmd = [path, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=8000", "--dump-dom", f"{app.base}/?token={token}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        dom, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("chromium did not finish")
    assert "<title>tether annotate</title>" in dom, err[-2000:]
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;&lt;b&gt;bold?&lt;/b&gt; **markdown** `code`" in dom
    assert "pwned</title>" not in dom and "<b>bold?</b>" not in dom


def test_end_to_end_label_pairs_to_annotate_to_export_to_rm(tmp_path):
    """`tether label` -> the app (answers posted over HTTP) -> `tether annotate export` -> `tether rm`."""
    from tether.annotate.store import pairs_from_file
    from tether.cli import main
    from tether.data import read_rows

    assert main(["label", "--model", "builtin:tiny", "--task", "test_tasks:EchoTask", "--out", str(tmp_path / "label"),
                 "--set", "sample.k=3", "--set", "sample.max_new_tokens=6", "--set", "sample.temperature=1.0",
                 "--set", "sample.top_p=1.0", "--set", "task.num_prompts=6", "--set", "task.num_eval_prompts=1"]) == 0
    db = str(tmp_path / "ann.db")
    store = Store(db)
    assert store.add_pairs(pairs_from_file(str(tmp_path / "label" / "train.jsonl"))) >= 6
    tokens = [store.add_annotator(n) for n in ("ann", "bob")]
    app = App(store, overlap=2)
    try:
        for t in tokens:
            while not (x := app.call("/api/next", token=t)[1])["done"]:
                longer_left = len(x["left"]) >= len(x["right"])  # both prefer the longer response
                assert app.call("/api/answer", {"assignment": x["assignment"], "choice": "left" if longer_left else "right"},
                                token=t)[0] == 200
    finally:
        app.stop()
    out, folder = tmp_path / "prefs.jsonl", tmp_path / "prefs-ds"
    assert main(["annotate", "export", "--db", db, "--out", str(out), "--datasets-folder", str(folder)]) == 0
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert exported and all(r["p_chosen"] == 1.0 and len(r["chosen"]) >= len(r["rejected"]) for r in exported)
    assert len(read_rows(str(folder)).rows) == len(exported)  # the datasets folder holds the same rows
    assert main(["annotate", "export", "--db", db, "--out", str(tmp_path / "kto.jsonl"), "--kto"]) == 0
    assert main(["annotate", "agreement", "--db", db]) == 0 and main(["annotate", "status", "--db", db]) == 0
    assert main(["rm", "--model", "builtin:tiny", "--data", str(out), "--out", str(tmp_path / "rm"), "--max-steps", "2",
                 "--batch-size", "2", "--dtype", "fp32", "--report-to", "none", "--set", "data.eval_fraction=0.34"]) == 0
    assert (tmp_path / "rm" / "model" / "config.json").is_file()


def test_load_20_annotators_and_sigkill_loses_no_committed_answer(tmp_path):
    """20 annotators x 50 answers on loopback against `tether annotate serve` (a real process): no lost or duplicated
    answer; then SIGKILL in the middle of a second burst: every answer that got its 200 is in the database."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from conftest import write_jsonl

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Q{i}?", "response_a": f"a{i}", "response_b": f"b{i}"}
                                                   for i in range(700)])
    db = str(tmp_path / "ann.db")
    store = Store(db)
    tokens = [store.add_annotator(f"a{k}") for k in range(20)]
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def start():
        p = subprocess.Popen([sys.executable, "-m", "tether", "annotate", "serve", "--db", db, "--pairs", str(pairs), "--port",
                              str(port), "--overlap", "2"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(400):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/next", timeout=1)
            except urllib.error.HTTPError:
                return p  # 401: it is up
            except OSError:
                time.sleep(0.05)
        p.kill()
        pytest.fail("the annotation server did not start: " + p.stderr.read().decode()[-2000:])

    client = App.__new__(App)
    client.base = f"http://127.0.0.1:{port}"
    lat, acked = [], []

    def annotator(token, n):
        for _ in range(n):
            try:
                t0 = time.perf_counter()
                _, x = client.call("/api/next", token=token)
                status, r = client.call("/api/answer", {"assignment": x["assignment"], "choice": "left"}, token=token)
                lat.append(time.perf_counter() - t0)
                if status == 200:
                    acked.append(r["assignment"])
            except (OSError, KeyError, json.JSONDecodeError, http.client.HTTPException):
                return  # the server was killed

    proc = start()
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(20) as pool:
            list(pool.map(lambda t: annotator(t, 50), tokens))
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    votes = Store(db).votes()
    assert sum(len(v) for v in votes.values()) == 1000 == len(acked) == len(set(acked))
    assert all(len(v) <= 2 for v in votes.values())
    lat.sort()
    print(f"\nannotate load: 20 x 50 answers in {wall:.1f} s; next+answer latency p50 {lat[len(lat) // 2] * 1000:.0f} ms, "
          f"p99 {lat[int(len(lat) * 0.99)] * 1000:.0f} ms")
    # SIGKILL in the middle of a burst
    acked.clear()
    proc = start()
    killer = threading.Timer(1.5, lambda: os.kill(proc.pid, signal.SIGKILL))
    killer.start()
    with ThreadPoolExecutor(20) as pool:
        list(pool.map(lambda t: annotator(t, 100), tokens))
    proc.wait(timeout=20)
    killer.join()
    after = Store(db)
    with after.engine.connect() as c:
        answered = {r[0] for r in c.exec_driver_sql("SELECT assignment_id FROM answers")}
    assert acked and set(acked) <= answered  # every acknowledged answer survived the kill


def test_browser_signs_in_labels_three_pairs_with_the_keyboard_and_undoes_one(tmp_path):
    """Headless Chromium driven by Selenium (Debian's chromium-driver): the sign-in link, keys 1, 2, 3, then u; the
    database holds the first two answers, as the keys meant them on the sides shown."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver_path = shutil.which("chromedriver")
    if not driver_path:
        pytest.fail("chromedriver is needed: `apt-get install -y chromium-driver` as root (or `make browser`)")
    store = Store(str(tmp_path / "ann.db"))
    store.add_pairs([{"prompt": [{"role": "user", "content": f"Q{i}?"}], "a": f"answer a{i}", "b": f"answer b{i}"} for i in range(4)])
    token = store.add_annotator("kim")
    app = App(store, overlap=1)
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else shutil.which("chromium")
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'prof'}"):
        opts.add_argument(a)
    from selenium.webdriver.chrome.service import Service

    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        driver.get(f"{app.base}/?token={token}")
        wait = WebDriverWait(driver, 20)
        shown = []

        def current():
            return driver.find_element(By.ID, "left").text, driver.find_element(By.ID, "right").text

        for key in ("1", "2", "3"):
            wait.until(lambda d: current()[0] and current() not in shown)
            shown.append(current())
            driver.find_element(By.TAG_NAME, "body").send_keys(key)
        wait.until(lambda d: current() not in shown)
        driver.find_element(By.TAG_NAME, "body").send_keys("u")
        wait.until(lambda d: current() == shown[2])  # the undone pair is served again
    finally:
        driver.quit()
        app.stop()
    votes = store.votes()
    assert len(votes) == 2 and all(set(v) == {"kim"} for v in votes.values())
    by_prompt = {p["id"]: p for p in store.all_pairs()}
    got = sorted((by_prompt[pid]["prompt"][0]["content"], v["kim"]) for pid, v in votes.items())
    want = []
    for (left, _right), key in zip(shown[:2], ("1", "2")):
        i = left[-1]
        left_is_a = left.startswith("answer a")
        want.append((f"Q{i}?", ("a" if left_is_a else "b") if key == "1" else ("b" if left_is_a else "a")))
    assert got == sorted(want)
