"""`tether report RUN`: one self-contained HTML page plus each figure as a PNG, from whatever parts of a
run exist. Every figure is embedded as a base64 PNG data URI, the CSS is inline, there is no
JavaScript and no external URL, so the page opens from file:// anywhere. All user text (prompts,
responses, model, stage and path names) goes through `html.escape`.

Sections, each skipped when its inputs are missing: stages and the eval table (the last eval stage in
pipeline order); learning curves per training stage; over-optimisation (gold and proxy against
sqrt(KL), Gao et al. 2022, with eval models and best-of-n); length over training; per-check pass
rates; reward-model calibration and label agreement; sample responses side by side.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from pathlib import Path

# the Agg backend through its canvas class: no pyplot, no global backend switch, no figure registry
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tether.errors import TetherError

CURVES = {  # kind -> panels (title, y label, metric keys); other kinds get DEFAULT_CURVES
    "sft": [("loss", "loss (nats / token)", ["train/loss", "eval/loss"]), ("learning rate", "lr", ["train/lr"])],
    "rm": [("loss", "Bradley-Terry loss", ["train/loss", "eval/loss"]),
           ("accuracy", "pairwise accuracy", ["train/accuracy", "eval/accuracy"]),
           ("eval margin", "r_chosen - r_rejected", ["eval/margin"])],
    "ppo": [("proxy reward (RM score)", "score (normalised)", ["objective/scores"]),
            ("gold score", "gold", ["objective/gold", "eval/gold"]), ("KL to reference", "nats / response", ["objective/kl"]),
            ("response length", "tokens", ["response/length_mean"]), ("policy approx. KL", "approx KL", ["policy/approxkl"]),
            ("value loss", "loss", ["loss/value"]), ("KL coefficient", "beta", ["kl/beta"]),
            ("reward-model disagreement", "std across members", ["objective/ensemble_std"])],
}
CURVES |= {kind: [("loss", "loss", ["train/loss", "eval/loss"]),  # the direct methods (tether dpo / kto / orpo)
                   ("implicit reward accuracy", "share of pairs with r_c > r_r", ["rewards/accuracies", "eval/rewards/accuracies"]),
                   ("implicit rewards", "reward", ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
                   ("log-probs", "nats / response", ["logps/chosen", "logps/rejected"])]
             for kind in ("dpo", "kto", "orpo")}
DEFAULT_CURVES = [("loss", "loss", ["train/loss", "eval/loss"]), ("accuracy", "accuracy", ["train/accuracy", "eval/accuracy"]),
                  ("learning rate", "lr", ["train/lr"])]
SHOW_IF_CHANGING = {"train/lr", "kl/beta"}  # schedules: a panel only when they change
MAX_SAMPLE_PROMPTS, MAX_RESPONSE_CHARS = 8, 2000
CSS = """body{font-family:system-ui,sans-serif;max-width:1250px;margin:1.5em auto;padding:0 1em;color:#222;background:#fff}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.5em 0 1.2em;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.n{text-align:right;font-variant-numeric:tabular-nums}
.resp{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.85em;max-width:38em;overflow-wrap:anywhere}
.gold{color:#555;font-size:.85em;margin-top:.3em}figure{margin:1em 0}img{max-width:100%}
figcaption,.note{color:#555;font-size:.9em}nav a{margin-right:1em}"""


class _H(str):
    """Already-safe HTML (everything else put into a table is escaped)."""


class _N(str):
    """Text of a formatted number: escaped, right-aligned."""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, int):  # bool included
        return str(v)
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _dur(s) -> str:
    if not isinstance(s, (int, float)):
        return "–"
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {s % 60:02.0f} s" if s < 3600 else f"{int(s // 3600)} h {s % 3600 / 60:02.0f} min"


def _table(head: list, rows: list[list]) -> str:
    th = "".join(f"<th>{c if isinstance(c, _H) else _e(c)}</th>" for c in head)
    body = []
    for row in rows:
        cells = [f"<td>{c}</td>" if isinstance(c, _H) else f'<td class="n">{_e(c)}</td>' if isinstance(c, _N) else
                 f'<td class="n">{_e(_fmt(c))}</td>' if (c is None or isinstance(c, (int, float))) else f"<td>{_e(c)}</td>"
                 for c in row]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _m(s) -> str:
    """User text in a figure: no mathtext, and a leading '_' would hide a legend entry."""
    s = str(s).replace("$", r"\$")
    return " " + s if s.startswith("_") else s


# ---- reading ------------------------------------------------------------------------------------
def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _jsonl(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line half-written by a stage that is still running
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = {r["step"]: float(r[key]) for r in rows if _num(r.get("step")) and _num(r.get(key))}
    return sorted(pts), [pts[s] for s in sorted(pts)]


def _smooth(v: list[float], k: int = 3) -> list[float]:
    h = k // 2
    return [sum(v[max(0, i - h): i + h + 1]) / len(v[max(0, i - h): i + h + 1]) for i in range(len(v))]


def _kind_of(folder: Path, summary: dict | None, rows: list[dict]) -> str:
    if summary and isinstance(summary.get("stage"), str):
        return summary["stage"].replace("-", "_")
    for name, kind in (("results.json", "eval"), ("scores.jsonl", "eval_rm"), ("agreement.json", "label")):
        if (folder / name).exists():
            return kind
    keys = {k for r in rows for k in r}  # a stage still running has no summary yet
    return "ppo" if "objective/kl" in keys else "rm" if "train/accuracy" in keys else "sft" if "train/loss" in keys else "stage"


def _stage_dir(run: Path, st: dict) -> Path | None:
    cands = []
    p = Path(str(st["out"])) if st.get("out") else None
    if p:
        cands += [run / p, run / p.name]  # run / p is p itself when p is absolute
    if st.get("name"):
        cands.append(run / str(st["name"]))
    if p:
        cands.append(p)  # relative to where `tether run` was started
    return next((c for c in cands if c.is_dir()), None)


def load_run(run: Path) -> tuple[str, str | None, list[dict]]:
    """(name, recipe, stages): each stage {name, kind, status, wall_time_s, dir, rows, summary}."""
    pipe = _json(run / "pipeline.json")
    if isinstance(pipe, dict):
        name, recipe = str(pipe.get("name") or run.name), pipe.get("recipe")
        stages = [dict(st, dir=_stage_dir(run, st)) for st in pipe.get("stages") or [] if isinstance(st, dict)]
    elif (run / "summary.json").is_file() or (run / "metrics.jsonl").is_file():  # a single stage's folder
        s = _json(run / "summary.json") or {}
        name, recipe = run.name, None
        stages = [{"name": run.name, "kind": None, "status": s.get("status", "running"),
                   "wall_time_s": s.get("wall_time_s"), "dir": run}]
    else:
        raise TetherError(f"{run}: no pipeline.json (a `tether run` folder) nor summary.json (a stage folder)")
    for st in stages:
        d = st["dir"]
        st["rows"] = _jsonl(d / "metrics.jsonl") if d else []
        st["summary"] = (_json(d / "summary.json") if d else None) or {}
        st["kind"] = str(st.get("kind") or (_kind_of(d, st["summary"], st["rows"]) if d else "stage"))
        st["name"] = str(st.get("name") or st["kind"])
        # one row per flag; a resumed stage may have written a flag twice
        st["flags"] = list({(f.get("step"), f.get("flag")): f for f in (_jsonl(d / "monitor.jsonl") if d else [])}.values())
        if st["kind"] == "rm" and d and (d / "members").is_dir():  # a reward-model ensemble: each member's curves
            folders = sorted((p for p in (d / "members").glob("m*") if p.name[1:].isdigit()), key=lambda p: int(p.name[1:]))
            st["members"] = [{"name": f"{st['name']} member {p.name[1:]}", "kind": "rm", "flags": [], "rows": _jsonl(p / "metrics.jsonl")}
                             for p in folders]
        if st.get("skipped"):  # `tether run` reused this stage's earlier output
            st["status"] = f"{st.get('status', 'done')} (earlier run)"
    return name, recipe, stages


# ---- figures --------------------------------------------------------------------------------------
def fig_curves(st: dict) -> Figure | None:
    def shown(k):
        v = _series(st["rows"], k)[1]
        return len(set(v)) > 1 if k in SHOW_IF_CHANGING else bool(v)

    panels = [(t, y, [k for k in keys if shown(k)]) for t, y, keys in CURVES.get(st["kind"], DEFAULT_CURVES)]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    cols = min(3, len(panels))
    fig = Figure(figsize=(4.2 * cols, 3.1 * math.ceil(len(panels) / cols)), layout="constrained")
    axes = fig.subplots(math.ceil(len(panels) / cols), cols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    flag_steps = sorted({f["step"] for f in st["flags"] if _num(f.get("step"))})
    for ax, (title, ylabel, keys) in zip(axes, panels):
        for k in keys:
            x, y = _series(st["rows"], k)
            dots = k.startswith("eval/") or len(x) <= 12
            ax.plot(x, y, marker="o" if dots else None, ms=4, ls="--" if k.startswith("eval/") else "-", label=k)
        for i, s in enumerate(flag_steps):
            ax.axvline(s, color="tab:red", ls=":", alpha=0.6, label="monitor flag" if i == 0 else None)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if len(keys) > 1 or flag_steps:
            ax.legend(fontsize=8)
    fig.suptitle(_m(f"{st['name']} ({st['kind']}): learning curves"))
    return fig


def _kl_points(rows: list[dict], key: str) -> tuple[list, list[float], list[float]]:
    """Steps, sqrt(objective/kl) and `key` where both were logged."""
    kl = dict(zip(*_series(rows, "objective/kl")))
    y = dict(zip(*_series(rows, key)))
    steps = [s for s in sorted(y) if s in kl]
    return steps, [math.sqrt(max(kl[s], 0.0)) for s in steps], [y[s] for s in steps]


def fig_overopt(ppo: list[dict], results: dict | None) -> Figure | None:
    """Left: gold; right: proxy. PPO's objective/scores is the normalised (possibly mixed) training score,
    while the eval stage reports raw RM scores, so on the right those go on their own y axis."""
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    axes = fig.subplots(1, 2)
    models = [(lbl, m) for lbl, m in ((results or {}).get("models") or {}).items() if isinstance(m, dict) and _num(m.get("kl"))]
    bon = sorted((b for b in (results or {}).get("best_of_n") or [] if isinstance(b, dict) and _num(b.get("kl"))), key=lambda b: b["kl"])
    drawn = False
    for ax, key, eval_key, bon_key, what, ev_what in (
            (axes[0], "objective/gold", "gold_sampled", "gold", "gold score", None),
            (axes[1], "objective/scores", "rm_score_sampled", "rm_score", "PPO proxy score (normalised)", "raw RM score (eval)")):
        flagged = False
        for i, st in enumerate(ppo):
            steps, x, y = _kl_points(st["rows"], key)
            if not steps:
                continue
            drawn = True
            ax.plot(x, y, "o", ms=3, alpha=0.25, color=f"C{i}")
            xs, ys = zip(*sorted(zip(x, y)))  # a function of KL: the running mean runs over KL neighbours
            k = max(3, len(xs) // 20 * 2 + 1)  # light: 3 up to 39 iterations, about a tenth of them beyond
            ax.plot(xs, _smooth(list(ys), k), "-", color=f"C{i}", label=_m(f"{st['name']} (running mean of {k})"))
            fl = [steps.index(f["step"]) for f in st["flags"] if f.get("step") in steps]
            if fl:
                ax.plot([x[j] for j in fl], [y[j] for j in fl], "X", ms=10, color="tab:red", zorder=5,
                        label=None if flagged else "monitor flag")
                flagged = True
        pts = [(lbl, math.sqrt(max(m["kl"], 0.0)), m[eval_key]) for lbl, m in models if _num(m.get(eval_key))]
        curve = [(b.get("n"), math.sqrt(max(b["kl"], 0.0)), b[bon_key]) for b in bon if _num(b.get(bon_key))]
        ex = ax.twinx() if ev_what and (pts or curve) else ax
        for lbl, x, y in pts:
            ex.plot(x, y, "s", color="black", ms=6, label="eval models (sampled)" if lbl == pts[0][0] else None)
            ex.annotate(_m(lbl), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        if curve:
            ex.plot([c[1] for c in curve], [c[2] for c in curve], "D--", color="tab:gray", label="best-of-n")
            for n, x, y in curve:
                ex.annotate(f"n={n}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7, color="tab:gray")
        drawn = drawn or bool(pts or curve)
        ax.margins(x=0.12)  # room for the labels of the rightmost points
        ax.set(title=f"{what.split(' (')[0]} vs √KL", xlabel="√(KL to reference)  (√nats)", ylabel=what)
        if ex is not ax:
            ex.set_ylabel(ev_what + ": squares, best-of-n")
        ax.grid(alpha=0.3)
        handles = [h for a in ([ax] if ex is ax else [ax, ex]) for h in zip(*a.get_legend_handles_labels())]
        if handles:
            ax.legend(*zip(*handles), fontsize=8)
    if not drawn:
        return None
    fig.suptitle("Over-optimisation: gold and proxy against √KL (Gao et al. 2022)")
    return fig


def fig_length(ppo: list[dict], results: dict | None) -> Figure | None:
    lines = [(st, *_series(st["rows"], "response/length_mean")) for st in ppo]
    lines = [ln for ln in lines if ln[1]]
    if not lines:
        return None
    fig = Figure(figsize=(9, 4.2), layout="constrained")
    ax = fig.subplots()
    for i, (st, x, y) in enumerate(lines):
        ax.plot(x, y, "-", color=f"C{i}", label=_m(st["name"]))
    for j, (lbl, m) in enumerate(((results or {}).get("models") or {}).items()):
        if isinstance(m, dict) and _num(m.get("length")):
            ax.axhline(m["length"], color=f"C{len(lines) + j}", ls="--", alpha=0.7, label=_m(f"eval: {lbl}"))
    ax.set(title="Response length over training", xlabel="PPO iteration", ylabel="mean response length (tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def fig_checks(results: dict) -> Figure | None:
    models = {lbl: m.get("checks") or {} for lbl, m in (results.get("models") or {}).items() if isinstance(m, dict)}
    checks = list(dict.fromkeys(c for ch in models.values() for c in ch))
    if not checks or not models:
        return None
    fig = Figure(figsize=(max(7, 1.1 * len(checks) + 2), 4.4), layout="constrained")
    ax = fig.subplots()
    w = 0.8 / len(models)
    for i, (lbl, ch) in enumerate(models.items()):
        xs = [j - 0.4 + w * (i + 0.5) for j in range(len(checks))]
        ax.bar(xs, [ch.get(c) if _num(ch.get(c)) else 0.0 for c in checks], w, label=_m(lbl), color=f"C{i}")
    ax.set_xticks(range(len(checks)), [_m(c) for c in checks], rotation=30, ha="right")
    ax.set(title="Pass rate per check type", ylabel="pass rate", ylim=(0, 1.05))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def fig_calibration(scores: list[dict], name: str, bins: int = 10) -> Figure | None:
    ds = [r["r_chosen"] - r["r_rejected"] for r in scores if _num(r.get("r_chosen")) and _num(r.get("r_rejected"))]
    if not ds:
        return None
    p = [1 / (1 + math.exp(-d)) if d >= 0 else math.exp(d) / (1 + math.exp(d)) for d in ds]
    acc, conf, n = [0.0] * bins, [0.0] * bins, [0] * bins
    for q in p:
        c = max(q, 1 - q)
        b = min(bins - 1, int((c - 0.5) * 2 * bins))
        n[b], acc[b], conf[b] = n[b] + 1, acc[b] + (q > 0.5), conf[b] + c
    full = [b for b in range(bins) if n[b]]
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    ax, hx = fig.subplots(1, 2)
    ax.plot([0.5, 1], [0.5, 1], "--", color="gray", label="perfect calibration")
    ax.plot([conf[b] / n[b] for b in full], [acc[b] / n[b] for b in full], "o-", label="reward model")
    ax.set(title="Reliability diagram", xlabel="confidence max(p, 1-p), p = σ(r_chosen - r_rejected)",
           ylabel="accuracy vs labels", xlim=(0.5, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    hx.bar([0.5 + (b + 0.5) / (2 * bins) for b in range(bins)], n, width=0.9 / (2 * bins))
    hx.set(title="Pairs per confidence bin", xlabel="confidence", ylabel="pairs", xlim=(0.5, 1))
    fig.suptitle(_m(f"{name}: reward model calibration ({len(ds)} pairs)"))
    return fig


# ---- HTML -------------------------------------------------------------------------------------------
class _Figures:
    def __init__(self, out: Path):
        self.out, self.files = out, []

    def __call__(self, fig: Figure | None, stem: str, caption: str = "") -> str:
        if fig is None:
            return ""
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) + ".png"
        while name in self.files:
            name = name[:-4] + "_.png"
        FigureCanvasAgg(fig)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        (self.out / name).write_bytes(buf.getvalue())
        self.files.append(name)
        alt = fig.get_suptitle() or stem
        src = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        cap = f"<figcaption>{_e(caption)} ({_e(name)})</figcaption>" if caption else f"<figcaption>{_e(name)}</figcaption>"
        return f'<figure><img src="{src}" alt="{_e(alt)}">{cap}</figure>'


def _eval_table(results: dict) -> str:
    models = {k: m for k, m in (results.get("models") or {}).items() if isinstance(m, dict)}
    if not models:
        return ""
    roles = {lbl: ", ".join(r for r in ("reference", "baseline") if results.get(r) == lbl) for lbl in models}
    checks = list(dict.fromkeys(c for m in models.values() for c in (m.get("checks") or {})))

    def pm(m, k, se=None, digits=3):
        return _N(_fmt(m.get(k), digits) + (f" ± {_fmt(m.get(se), digits)}" if se and _num(m.get(se)) else "") if _num(m.get(k)) else "–")

    rows = [["model"] + [m.get("model", "") for m in models.values()],
            ["gold ± se"] + [pm(m, "gold", "gold_se") for m in models.values()],
            ["gold vs baseline (paired) ± se"] + [pm(m, "gold_vs_baseline", "gold_vs_baseline_se") for m in models.values()]]
    rows += [[f"check: {c}"] + [(m.get("checks") or {}).get(c) for m in models.values()] for c in checks]
    for label, key in (("RM score", "rm_score"), ("KL to reference (nats)", "kl"), ("gold (sampled)", "gold_sampled"),
                       ("length", "length"), ("EOS rate", "eos_rate"), ("distinct-2", "distinct_2"), ("repetition", "repetition"),
                       ("win rate vs baseline (gold)", "win_rate_gold"), ("win rate vs baseline (RM)", "win_rate_rm")):
        rows.append([label] + [pm(m, key, "kl_se" if key == "kl" else None, 1 if key == "length" else 3) for m in models.values()])
    info = ", ".join(f"{k} {_fmt(results[k])}" for k in ("task", "prompts", "reward_model") if results.get(k) is not None)
    return f'<p class="note">{_e(info)}</p>' + _table([""] + [lbl + (f" ({roles[lbl]})" if roles[lbl] else "") for lbl in models], rows)


def _samples_table(samples: list[dict], results: dict | None) -> str:
    by: dict = {}
    for r in samples:
        by.setdefault(r.get("prompt_id"), {}).setdefault(r.get("model"), r)
    pids = list(by)[:MAX_SAMPLE_PROMPTS]
    models = list(dict.fromkeys([*((results or {}).get("models") or {}), *(r.get("model") for r in samples)]))
    models = [m for m in models if any(m in by[p] for p in pids)]
    if not pids or not models:
        return ""

    def cell(r):
        if r is None:
            return _H("–")
        text = str(r.get("response", ""))
        text = text if len(text) <= MAX_RESPONSE_CHARS else text[:MAX_RESPONSE_CHARS] + " […]"
        return _H(f'<div class="resp">{_e(text)}</div><div class="gold">gold {_e(_fmt(r.get("gold")))}</div>')

    rows = [[_H(f'<div class="resp">{_e(next(iter(by[p].values())).get("prompt", ""))}</div>')] + [cell(by[p].get(m)) for m in models]
            for p in pids]
    return _table(["prompt"] + models, rows)


def _rm_section(have: list[dict], fig: _Figures) -> str:
    h = ""
    for s in (s for s in have if s["kind"] == "eval_rm"):
        rows = [[k, s["summary"][k]] for k in ("accuracy_vs_labels", "accuracy_vs_gold", "bayes_ceiling", "ece", "length_correlation",
                                                "ensemble_std") if k in s["summary"]]
        h += f"<h3>{_e(s['name'])}</h3>" + (_table(["metric", "value"], rows) if rows else "")
        h += fig(fig_calibration(_jsonl(s["dir"] / "scores.jsonl"), s["name"]), f"calibration_{s['name']}")
    for s in (s for s in have if s["kind"] == "label"):
        a, sm = s["summary"].get("agreement") or {}, s["summary"]
        rows = [[k, a[k]] for k in ("raw_agreement", "cohen_kappa_pairwise", "krippendorff_alpha") if k in a]
        rows += [[f"{split}: {k}", sm[split][k]] for split in ("train", "eval") if isinstance(sm.get(split), dict)
                 for k in ("pairs", "gold_mean", "bayes_ceiling") if k in sm[split]]
        h += f"<h3>{_e(s['name'])}: label agreement</h3>" + _table(["metric", "value"], rows) if rows else ""
    return h


def write_report(run, out=None) -> Path:
    """Write OUT (default RUN/report/): index.html, self-contained, and each figure as a PNG. Returns index.html."""
    run = Path(run)
    if not run.is_dir():
        raise TetherError(f"{run}: no such run folder")
    name, recipe, stages = load_run(run)
    out = Path(out) if out else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    fig, sections = _Figures(out), []
    have = [s for s in stages if s["dir"]]
    ppo = [s for s in have if s["kind"] == "ppo"]
    evals = [s for s in have if s["kind"] == "eval" and isinstance(_json(s["dir"] / "results.json"), dict)]
    ev = evals[-1] if evals else None
    results = _json(ev["dir"] / "results.json") if ev else None

    def add(anchor: str, title: str, body: str) -> None:
        if body:
            sections.append((anchor, title, body))

    add("stages", "Stages", f'<p class="note">run folder {_e(run)}' + (f", recipe {_e(recipe)}" if recipe else "") + "</p>"
        + _table(["stage", "kind", "status", "wall time", "folder"],
                 [[s["name"], s["kind"], s.get("status", "–"), _dur(s.get("wall_time_s", s["summary"].get("wall_time_s"))),
                   str(s["dir"]) if s["dir"] else "(missing)"] for s in stages]))
    add("eval", f"Evaluation ({ev['name']})" if ev else "", _eval_table(results) if results else "")
    add("curves", "Learning curves", "".join(fig(fig_curves(s), f"curves_{s['name']}") for st in have for s in st.get("members") or [st]))
    flags = [[s["name"], f.get("step"), f.get("flag", ""), f.get("message", "")] for s in ppo for f in s["flags"]]
    add("overopt", "Over-optimisation", fig(fig_overopt(ppo, results), "overoptimisation",
                                            "PPO: per-iteration gold / proxy of the training responses (faint dots; line: running mean "
                                            "over neighbours in KL), red crosses: monitor flags; squares: eval models (temperature-1 samples); diamonds: "
                                            "best-of-n. Right panel: eval models and best-of-n on the right axis (raw RM score; PPO's "
                                            "training score is normalised)")
        + ("<h3>Monitor flags</h3>" + _table(["stage", "step", "flag", "message"], flags) if flags else ""))
    add("length", "Length over training", fig(fig_length(ppo, results), "length",
                                              "dashed lines: mean lengths of the eval models, as logged by the eval stage"))
    add("checks", "Per-check pass rates", fig(fig_checks(results), "checks") if results else "")
    add("rm", "Reward model and labels", _rm_section(have, fig))
    samples = _samples_table(_jsonl(ev["dir"] / "samples.jsonl"), results) if ev else ""
    add("samples", "Sample responses", samples and f'<p class="note">the first {MAX_SAMPLE_PROMPTS} prompts of {_e(ev["name"])}: '
        "each model's response and its gold score</p>" + samples)

    nav = "<nav>" + "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t, _ in sections) + "</nav>"
    body = "".join(f'<section id="{a}"><h2>{_e(t)}</h2>{h}</section>' for a, t, h in sections)
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(name)}: tether report</title>'
            f"<style>{CSS}</style></head>\n<body><h1>{_e(name)}</h1>{nav}{body}</body></html>\n")
    tmp = out / ".index.html.tmp"  # written whole, then renamed: a reader never sees half a page
    tmp.write_text(page, encoding="utf-8")
    return tmp.replace(out / "index.html")
