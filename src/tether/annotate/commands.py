"""The `tether annotate ...` commands (the CLI only parses flags and calls these)."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from tether.annotate.export import agreement_report, preference_rows, unpaired_rows
from tether.annotate.store import Store, pairs_from_file
from tether.data import write_jsonl
from tether.errors import TetherError

log = logging.getLogger("tether")


def uncertainty_priorities(store: Store, reward_model: str) -> dict[int, float]:
    """Active selection: a pair's priority is how unsure the reward model is about it, 1 - |2 p - 1| with
    p = sigmoid(r_a - r_b) (1 = a coin flip); for an ensemble, plus the members' std of r_a - r_b, so the
    pairs the members disagree on most come first."""
    import torch

    from tether.models import default_device, load_reward_ensemble, score_conversations

    members, tok = load_reward_ensemble(reward_model)
    device = default_device()
    for m in members:
        m.to(device).eval().requires_grad_(False)
    pairs = [p for p in store.all_pairs() if p["gold"] is None]
    if not pairs:
        return {}
    convs = [p["prompt"] + [{"role": "assistant", "content": p[side]}] for p in pairs for side in ("response_a", "response_b")]
    with torch.no_grad():
        scores = score_conversations(members, tok, convs, device, torch.float32)  # (members, 2 * pairs)
    diff = scores[:, 0::2] - scores[:, 1::2]  # (members, pairs)
    p = torch.sigmoid(diff.mean(0))
    prio = 1 - (2 * p - 1).abs()
    if diff.shape[0] > 1:
        prio = prio + diff.std(0)
    return {pair["id"]: float(x) for pair, x in zip(pairs, prio)}


def serve(db: str, pairs: list[str], gold: list[str], overlap: int, gold_rate: float, reward_model: str, host: str, port: int,
          admin_token_env: str, guidelines: str) -> None:
    try:
        import uvicorn
    except ImportError:
        raise TetherError("tether annotate serve needs fastapi and uvicorn: pip install fastapi uvicorn") from None
    from tether.annotate.app import build_app

    if overlap < 1:
        raise TetherError(f"--overlap must be >= 1, got {overlap}")
    if not 0 <= gold_rate < 1:
        raise TetherError(f"--gold-rate must be in [0, 1), got {gold_rate}")
    store = Store(db)
    for path in pairs:
        log.info("annotate: %d new pairs from %s", store.add_pairs(pairs_from_file(path)), path)
    for path in gold:
        log.info("annotate: %d new gold items from %s", store.add_pairs(pairs_from_file(path, gold=True)), path)
    if reward_model:
        prio = uncertainty_priorities(store, reward_model)
        store.set_priorities(prio)
        log.info("annotate: active selection by %s: the %d pairs ordered by its uncertainty", reward_model, len(prio))
    admin = os.environ.get(admin_token_env, "") if admin_token_env else ""
    if admin_token_env and not admin:
        raise TetherError(f"--admin-token-env names {admin_token_env}, which is not set")
    text = Path(guidelines).read_text(encoding="utf-8") if guidelines else ""
    app = build_app(store, overlap=overlap, gold_rate=gold_rate, admin_token=admin, guidelines=text)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("tether annotate: listening on %s, reachable from other machines", host)
    log.info("tether annotate: http://%s:%d/ (annotators sign in with the link from `tether annotate add-annotator`)", host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def add_annotator(db: str, name: str, url: str) -> str:
    token = Store(db).add_annotator(name)
    return f"annotator {name}: token {token}\n  sign-in link: {url.rstrip('/')}/?token={token}\n  (shown once; only its hash is stored)"


def status(db: str) -> str:
    p = Store(db).progress()
    lines = [f"{p['answers']} answers on {p['pairs']} pairs"]
    for name, s in p["annotators"].items():
        rate = f"{s['per_hour']:.0f}/hour" if s["per_hour"] else "-"
        lines.append(f"  {name:<20} {s['answers']:>6} answers  {s['skipped']:>4} skipped  {rate}")
    return "\n".join(lines)


def agreement(db: str) -> str:
    a = agreement_report(Store(db))

    def f(x):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    lines = [f"{a.get('items', 0)} pairs with votes: raw agreement {f(a.get('raw_agreement'))}, Cohen's kappa (pairwise mean) "
             f"{f(a.get('cohen_kappa_pairwise'))}, Krippendorff's alpha {f(a.get('krippendorff_alpha'))}"]
    for pk in a.get("kappa_by_pair", []):
        lines.append(f"  kappa {pk['annotators'][0]} / {pk['annotators'][1]}: {f(pk['kappa'])} on {pk['items']} pairs")
    for name, s in a["annotators"].items():
        lines.append(f"  {name:<20} {s['answers']:>5} answers  with majority {f(s['agreement_with_majority'])}  gold "
                     f"{f(s['gold_accuracy'])} ({s['gold_items']} items)  picked left {f(s['picked_left'])}")
    return "\n".join(lines)


def export(db: str, out: str, keep_ties: bool, kto: bool, datasets_folder: str = "") -> str:
    rows = preference_rows(Store(db), keep_ties=keep_ties)
    if not rows:
        raise TetherError(f"{db}: no pair has a preference yet (votes a or b{', or ties' if keep_ties else ''})")
    rows = unpaired_rows(rows) if kto else rows
    if datasets_folder:
        from tether.annotate.export import save_datasets_folder

        save_datasets_folder(rows, datasets_folder)
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(p, rows)
    return f"wrote {len(rows)} {'unpaired examples' if kto else 'preference pairs'} to {p}"


def export_stage(cfg) -> dict:
    """The pipeline stage (kind annotate_export): OUT/train.jsonl from the database, a summary for ${stage.train}."""
    from tether.runloop import Run

    if not cfg.db:
        raise TetherError("annotate_export needs db: the annotation database")
    if "://" not in cfg.db and not Path(cfg.db).expanduser().is_file():
        raise TetherError(f"annotation database not found: {cfg.db}")
    store = Store(cfg.db)
    pref = preference_rows(store, keep_ties=cfg.keep_ties)
    if len(pref) < cfg.min_pairs:
        raise TetherError(f"{cfg.db}: {len(pref)} pairs have a preference, fewer than min_pairs={cfg.min_pairs}")
    rows = unpaired_rows(pref) if cfg.kto else pref
    with Run(cfg.out, cfg, report_to="none") as run:
        path = run.out / "train.jsonl"
        write_jsonl(path, rows)
        prog = store.progress()
        return run.finish({"stage": "annotate_export", "status": "done", "answers": prog["answers"],
                           "annotators": len(prog["annotators"]), "train": {"path": str(path), "rows": len(rows), "pairs": len(pref)}})
