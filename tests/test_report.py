"""`tether report`: a self-contained HTML page from whatever parts of a run exist, checked as text and
as rendered by headless Chromium (Debian's `chromium`; `make browser` installs it)."""

import base64
import io
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess

import pytest
from PIL import Image

from tether.cli import main
from tether.report import write_report

XSS = "Sure <script>alert(1)</script> & done"
FULL_FIGURES = {"curves_sft.png", "curves_rm.png", "curves_ppo.png", "curves_ppo_low_beta.png", "overoptimisation.png",
                "length.png", "checks.png", "calibration_eval_rm.png"}
FULL_HEADINGS = ["Stages", "Evaluation (eval)", "Learning curves", "Over-optimisation", "Length over training",
                 "Per-check pass rates", "Reward model and labels", "Sample responses"]
CHECKS = ["lowercase", "word_limit", "json_keys", "refusal"]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _stage(run, name, kind, rows=(), summary=None, **files):
    d = run / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(f"# {kind}\nseed: 0\n")
    if rows:
        _jsonl(d / "metrics.jsonl", rows)
    if summary is not None:
        (d / "summary.json").write_text(json.dumps({"stage": kind.replace("_", "-"), "status": "done", **summary}))
    for fname, content in files.items():
        fname = fname.replace("__", ".")
        if isinstance(content, list):
            _jsonl(d / fname, content)
        else:
            (d / fname).write_text(json.dumps(content))
    return d


def _eval_results(labels):
    models = {}
    for i, lbl in enumerate(labels):
        models[lbl] = {"model": f"runs/demo/{lbl}/model" if i else "builtin:smollm2 <i>base</i>", "gold": 0.5 + 0.1 * i,
                       "gold_se": 0.02, "checks": {c: min(1.0, 0.3 + 0.2 * i + 0.05 * j) for j, c in enumerate(CHECKS)},
                       "penalties": {"repetition": 0.01}, "rm_score": None if i == 0 else 0.4 * i, "kl": 0.0 if i == 0 else 2.0 * i,
                       "kl_se": 0.1, "gold_sampled": 0.45 + 0.1 * i, "rm_score_sampled": -0.2 + 0.5 * i, "length": 40.0 + 15 * i,
                       "eos_rate": 0.9, "distinct_1": 0.6, "distinct_2": 0.8, "repetition": 0.05,
                       "win_rate_gold": None if i == 0 else 0.5 + 0.1 * i, "win_rate_rm": None, "time_s": 3.0}
    bon = [{"n": n, "kl": math.log(n) - (n - 1) / n, "gold": 0.5 + 0.03 * math.log2(n), "rm_score": 0.3 * math.log2(n)}
           for n in (1, 2, 4, 8, 16)]
    return {"task": "builtin:instruct", "prompts": 10, "reference": labels[0], "baseline": labels[0],
            "reward_model": "runs/demo/rm/model", "models": models, "best_of_n": bon}


def _eval_samples(labels):
    rows = []
    for p in range(10):
        for i, lbl in enumerate(labels):
            text = XSS if (p, i) == (1, len(labels) - 1) else f"Answer {p} from {lbl}.\n  - indented line"
            rows.append({"prompt_id": f"p{p:02d}", "prompt": f"Prompt {p}: answer in lower case & briefly", "model": lbl,
                         "response": text, "gold": 0.5 + 0.01 * p, "checks": {"lowercase": 1.0}, "rm_score": 0.1,
                         "length": len(text), "finished": True})
    return rows


def _ppo_rows(n, peak, flag_step=None, growth=1.5):
    rows = [{"step": 0, "eval/gold": 0.5}]
    for it in range(1, n + 1):
        kl = 0.15 * it * (1 + 0.1 * math.sin(it))
        rows.append({"step": it, "objective/scores": 0.05 * it, "objective/gold": 0.5 + 0.02 * it - 0.02 * max(0, it - peak) ** 1.3,
                     "objective/kl": kl, "response/length_mean": 40 + growth * it, "policy/approxkl": 0.01, "loss/value": 1 / it,
                     "kl/beta": 0.05 + 0.001 * it, "monitor/gold_falls_while_proxy_rises": float(it == flag_step)})
        if it % 10 == 0:
            rows.append({"step": it, "eval/gold": 0.5 + 0.01 * it})
    return rows


def make_run(root, parts=("sft", "label", "rm", "eval_rm", "ppo", "ppo_low_beta", "eval_base", "eval"), running=()):
    """A fake but plausible `tether run` folder with the stages in `parts` (names imply kinds)."""
    run = root / "demo"
    run.mkdir(parents=True)
    rng = random.Random(0)
    kinds = {"eval_base": "eval", "ppo_low_beta": "ppo"}
    stages = []
    for name in parts:
        kind = kinds.get(name, name)
        stages.append({"name": name, "kind": kind, "out": f"runs/demo/{name}", "status": "running" if name in running else "done",
                       "wall_time_s": 12.5 + 100 * len(stages), **({"skipped": True} if name == "sft" else {})})
        if name == "sft":
            rows = [{"step": 0, "eval/loss": 2.6}] + [{"step": s, "train/loss": 2.5 * 0.97 ** s, "train/lr": 1e-5 * min(1, s / 5)} for s in range(1, 31)]
            _stage(run, name, kind, rows + [{"step": 30, "eval/loss": 1.9}], {"wall_time_s": 12.5})
        elif name == "label":
            split = {"gold_mean": 0.52, "pairs": 600, "bayes_ceiling": 0.71, "prompts": 100}
            _stage(run, name, kind, summary={"agreement": {"raw_agreement": 0.74, "cohen_kappa_pairwise": 0.45,
                                                           "krippendorff_alpha": 0.44}, "train": split, "eval": split})
        elif name == "rm":
            rows = [{"step": s, "train/loss": 0.69 * 0.98 ** s, "train/accuracy": 0.5 + 0.006 * s} for s in range(1, 41)]
            rows += [{"step": s, "eval/loss": 0.7 - 0.002 * s, "eval/accuracy": 0.55 + 0.003 * s, "eval/margin": 0.02 * s}
                     for s in (0, 10, 20, 30, 40)]
            d = _stage(run, name, kind, rows if name not in running else rows[:20], None if name in running else {})
            if name in running:  # a half-written last line
                with open(d / "metrics.jsonl", "a") as f:
                    f.write('{"step": 21, "train/lo')
        elif name == "eval_rm":
            scores = [{"row": i, "r_chosen": rng.gauss(0.6, 1.2), "r_rejected": rng.gauss(0, 1.2)} for i in range(300)]
            _stage(run, name, kind, summary={"accuracy_vs_labels": 0.66, "accuracy_vs_gold": 0.7, "ece": 0.04,
                                             "bayes_ceiling": 0.71, "length_correlation": 0.12}, scores__jsonl=scores)
        elif kind == "ppo":
            flag = 24 if name == "ppo" else None
            monitor = [{"step": 24, "flag": "gold_falls_while_proxy_rises", "message": "gold fell 0.05 while the proxy rose <fast>"}] * 2
            samples = [{"step": 10, "prompt": "Say hi & bye", "response": XSS, "score": 0.3, "gold": 0.2}]
            _stage(run, name, kind, _ppo_rows(30, 18 if flag else 25, flag, 1.5 if flag else 0.8), {}, samples__jsonl=samples,
                   **({"monitor__jsonl": monitor} if flag else {}))
        elif name == "eval_base":
            _stage(run, name, kind, summary={}, results__json=_eval_results(["only-in-eval-base"]),
                   samples__jsonl=_eval_samples(["only-in-eval-base"]))
        elif name == "eval":
            labels = ["base", "sft", "ppo&co"]
            _stage(run, name, kind, summary={}, results__json=_eval_results(labels), samples__jsonl=_eval_samples(labels))
    (run / "pipeline.json").write_text(json.dumps({"name": "demo <run>", "recipe": "recipes/demo.yaml", "stages": stages}))
    return run


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("report"))
    index = write_report(run)
    return run, index, index.read_text(encoding="utf-8")


def _img_srcs(text):
    return re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", text)


def test_report_writes_index_and_every_figure_embedded(full):
    run, index, text = full
    assert index == run / "report" / "index.html"
    pngs = {p.name: p.read_bytes() for p in index.parent.glob("*.png")}
    assert set(pngs) == FULL_FIGURES
    srcs = _img_srcs(text)
    assert len(srcs) == text.count("<img") == len(FULL_FIGURES)
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data in pngs.values()
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200
    for h in FULL_HEADINGS:
        assert f"<h2>{h}</h2>" in text


def test_report_is_self_contained_and_escaped(full):
    _, _, text = full
    assert not re.search(r"https?://", text) and "url(" not in text and "<link" not in text
    assert "<script" not in text.lower()  # no JavaScript at all, and the response's script only escaped
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; done" in text
    assert "<i>base</i>" not in text and "&lt;i&gt;base&lt;/i&gt;" in text  # model path
    assert "ppo&amp;co" in text and "ppo&co" not in text  # model label
    assert "<h1>demo &lt;run&gt;</h1>" in text
    assert "proxy rose &lt;fast&gt;" in text  # monitor message, in the flags table
    assert "white-space:pre-wrap" in text


def test_report_tables(full):
    _, _, text = full
    assert "only-in-eval-base" not in text  # the last eval stage in pipeline order
    assert "0.700 ± 0.020" in text and "check: json_keys" in text and "4.000 ± 0.100" in text  # gold, a check, KL of 'ppo&co'
    assert text.count("gold_falls_while_proxy_rises") == 1  # one flag (written twice, by a resumed stage)
    assert "done (earlier run)" in text and "1 min 52 s" in text  # a stage reused by `tether run`; a wall time
    assert "cohen_kappa_pairwise" in text and "accuracy_vs_gold" in text
    samples = text.split('id="samples"')[1]
    assert samples.count("<tr>") == 1 + 8  # header + the first 8 prompts
    assert "Prompt 7:" in samples and "Prompt 8:" not in samples


def test_sft_only_run(tmp_path):
    run = make_run(tmp_path, parts=("sft",))
    text = write_report(run, tmp_path / "elsewhere").read_text()
    assert {p.name for p in (tmp_path / "elsewhere").glob("*.png")} == {"curves_sft.png"}
    assert len(_img_srcs(text)) == 1 and "<h2>Learning curves</h2>" in text
    for h in FULL_HEADINGS[1:]:
        if h != "Learning curves":
            assert f"<h2>{h}</h2>" not in text


def test_partial_run_skips_what_is_missing(tmp_path):
    run = make_run(tmp_path, parts=("sft", "rm", "ppo", "eval"), running=("rm",))
    shutil.rmtree(run / "ppo")  # listed in pipeline.json, never started
    (run / "eval" / "samples.jsonl").unlink()
    text = write_report(run).read_text()
    figures = {p.name for p in (run / "report").glob("*.png")}
    assert figures == {"curves_sft.png", "curves_rm.png", "overoptimisation.png", "checks.png"}  # no ppo: no length figure
    assert "(missing)" in text and "running" in text and "<h2>Sample responses</h2>" not in text


def test_single_stage_folder(tmp_path):
    run = make_run(tmp_path, parts=("sft", "rm"))
    index = write_report(run / "rm")
    assert index == run / "rm" / "report" / "index.html"
    assert [p.name for p in index.parent.glob("*.png")] == ["curves_rm.png"]
    assert len(_img_srcs(index.read_text())) == 1


def test_cli_report(tmp_path, capsys):
    run = make_run(tmp_path, parts=("sft",))
    assert main(["report", str(run), "--out", str(tmp_path / "r")]) == 0
    assert str(tmp_path / "r" / "index.html") in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nothing")]) == 2


# ---- rendered by headless Chromium -----------------------------------------------------------------
def _chromium():
    path = "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else shutil.which("chromium")
    if not path:
        pytest.fail("headless Chromium is needed to check the HTML report: install Debian's package with "
                    "`apt-get install -y chromium` as root (or run `make browser`)")
    return path


def test_missing_chromium_fails_with_the_install_command(monkeypatch):
    monkeypatch.setattr(os, "access", lambda *a: False)
    monkeypatch.setattr(shutil, "which", lambda *a: None)
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y chromium"):
        _chromium()


def _render(page, tmp):
    """(DOM after rendering, screenshot, console messages of the page) from one headless Chromium run."""
    shot = tmp / "shot.png"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp / 'profile'}",
           "--window-size=1280,3000", f"--screenshot={shot}", "--dump-dom", "--enable-logging=stderr", "--v=0", page.as_uri()]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp, start_new_session=True)
    try:
        dom, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # e.g. a page blocked on an alert(): end the browser and all its children
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"chromium did not finish rendering {page.name} within 60 s (a script dialog blocks it):\n{err[-2000:]}")
    assert proc.returncode == 0, err[-3000:]
    assert shot.is_file(), f"no screenshot written; chromium said:\n{err[-3000:]}"
    # stderr is full of browser noise (D-Bus "ERROR" lines, GPU warnings); the page's console lines read
    # [pid:tid:time:INFO:CONSOLE:1] "Uncaught ReferenceError: ...", source: file:///.../index.html (1)
    console = [line for line in err.splitlines() if ":CONSOLE" in line]
    with Image.open(shot) as im:
        return dom, im.convert("RGB"), console


def _plot_pixels(im):
    """Pixels of matplotlib's first two colours (tab:blue, tab:orange): only the embedded figures have them."""
    targets = [(31, 119, 180), (255, 127, 14)]
    return sum(n for n, c in im.getcolors(1 << 24) if any(all(abs(a - b) <= 10 for a, b in zip(c, t)) for t in targets))


def test_chromium_renders_the_report(full, tmp_path):
    _, index, _ = full
    dom, im, console = _render(index, tmp_path)
    assert console == [], f"console messages from the page: {console}"
    assert im.size == (1280, 3000)
    colours = im.getcolors(1 << 24)
    non_white = sum(n for n, c in colours if c != (255, 255, 255))
    assert len(colours) > 200 and non_white > 0.05 * im.width * im.height, "the screenshot is (nearly) blank"
    assert _plot_pixels(im) > 500, "no plot lines on screen: the figures did not render"
    imgs = re.findall(r"<img\b[^>]*>", dom)
    assert len(imgs) == len(FULL_FIGURES) and all('src="data:image/png;base64,' in t for t in imgs)
    for h in FULL_HEADINGS:
        assert f"<h2>{h}</h2>" in dom
    assert "<script" not in dom.lower() and "&lt;script&gt;alert(1)&lt;/script&gt;" in dom


def test_chromium_check_catches_a_broken_page(full, tmp_path):
    """The checks above are real: broken images and a script error are seen."""
    text = full[2]
    broken = re.sub(r"base64,[A-Za-z0-9+/=]+", "base64,AAAA", text).replace("</body>", "<script>notDefined()</script></body>")
    page = tmp_path / "broken.html"
    page.write_text(broken, encoding="utf-8")
    _, im, console = _render(page, tmp_path)
    assert _plot_pixels(im) < 50
    assert any("Uncaught" in line for line in console), console
