"""The annotation store: assignment with overlap, answers and undo, export, agreement statistics (issue 16)."""

import json
import threading

import pytest

from conftest import new_store, write_jsonl
from tether.errors import TetherError

pytest.importorskip("sqlalchemy")
from tether.annotate.export import agreement_report, preference_rows, unpaired_rows  # noqa: E402
from tether.annotate.store import Store, pairs_from_file  # noqa: E402


def _pairs(n, gold=None):
    return [{"prompt": [{"role": "user", "content": f"Q{i}?"}], "a": f"answer a{i}", "b": f"answer b{i}", "gold": gold,
             "meta": {"chosen_gold": 1.0, "rejected_gold": 0.0}} for i in range(n)]


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    """Every store test on SQLite and on PostgreSQL (a fresh database each)."""
    s = new_store(request, tmp_path)
    yield s
    s.engine.dispose()


def test_tokens_are_stored_hashed_and_identify_their_annotator(store, tmp_path):
    t1, t2 = store.add_annotator("ann"), store.add_annotator("bob")
    assert t1 != t2 and store.annotator_for(t1)["name"] == "ann" and store.annotator_for("wrong") is None
    assert store.annotator_for("") is None
    with pytest.raises(TetherError, match="exists already"):
        store.add_annotator("ann")
    with store.engine.connect() as c:
        stored = [r[0] for r in c.exec_driver_sql("SELECT token_hash FROM annotators")]
    assert t1 not in stored and t2 not in stored and len(stored[0]) == 64
    if store.engine.dialect.name == "sqlite":
        raw = b"".join(f.read_bytes() for f in tmp_path.glob("ann.db*"))
        assert t1.encode() not in raw and t2.encode() not in raw
        with store.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_overlap_is_finished_before_new_pairs_and_never_twice_to_one_person(store):
    store.add_pairs(_pairs(3))
    ids = {n: store.annotator_for(store.add_annotator(n))["id"] for n in ("ann", "bob", "cy")}
    first = store.next_assignment(ids["ann"], overlap=2)
    assert store.next_assignment(ids["ann"], overlap=2)["assignment"] == first["assignment"]  # open until answered
    store.answer(ids["ann"], first["assignment"], "left")
    b1 = store.next_assignment(ids["bob"], overlap=2)
    assert b1["pair"] == first["pair"]  # the started pair first
    store.answer(ids["bob"], b1["assignment"], "right")
    c1 = store.next_assignment(ids["cy"], overlap=2)
    assert c1["pair"] != first["pair"]  # that pair has its 2 annotators
    seen = {}
    for name, i in ids.items():
        while (x := store.next_assignment(i, overlap=2)) is not None:
            seen.setdefault(name, []).append(x["pair"])
            store.answer(i, x["assignment"], "tie")
    votes = store.votes()
    assert all(len(v) == 2 for v in votes.values()) and len(votes) == 3
    assert all(len(p) == len(set(p)) for p in seen.values())


def test_left_right_are_recorded_and_mapped_to_a_b(store):
    store.add_pairs(_pairs(1))
    i = store.annotator_for(store.add_annotator("ann"))["id"]
    x = store.next_assignment(i)
    side = "a" if x["left"] == "answer a0" else "b"
    store.answer(i, x["assignment"], "left", strength=3, reason="clearer")
    assert store.votes() == {x["pair"]: {"ann": side}}
    assert store.sides_shown() == [("ann", side, side)]
    with pytest.raises(ValueError, match="answered already"):
        store.answer(i, x["assignment"], "right")
    with pytest.raises(ValueError, match="strength"):
        store.answer(i, x["assignment"], "right", strength=7)


def test_undo_takes_back_the_last_answer_and_serves_it_again(store):
    store.add_pairs(_pairs(3))
    i = store.annotator_for(store.add_annotator("ann"))["id"]
    a1 = store.next_assignment(i)
    store.answer(i, a1["assignment"], "left")
    a2 = store.next_assignment(i)
    store.answer(i, a2["assignment"], "right")
    store.next_assignment(i)  # opened, not answered
    assert store.undo(i) == a2["assignment"]
    assert set(store.votes()) == {a1["pair"]}
    assert store.next_assignment(i)["assignment"] == a2["assignment"]
    assert store.undo(i) == a1["assignment"] and store.votes() == {}
    assert store.undo(i) is None


def test_one_annotator_cannot_answer_anothers_assignment(store):
    store.add_pairs(_pairs(1))
    ann, bob = (store.annotator_for(store.add_annotator(n))["id"] for n in ("ann", "bob"))
    x = store.next_assignment(ann)
    with pytest.raises(PermissionError):
        store.answer(bob, x["assignment"], "left")


def test_active_selection_serves_the_highest_priority_first(store):
    items = _pairs(4)
    for it, p in zip(items, (0.1, 0.9, 0.5, 0.2)):
        it["priority"] = p
    store.add_pairs(items)
    i = store.annotator_for(store.add_annotator("ann"))["id"]
    order = []
    while (x := store.next_assignment(i, overlap=1)) is not None:
        order.append(x["prompt"][0]["content"])
        store.answer(i, x["assignment"], "left")
    assert order == ["Q1?", "Q2?", "Q3?", "Q0?"]


def _answer_as(store, name, pair_choice):
    """Answer every pair the annotator is given with pair_choice[pair prompt] in a/b terms."""
    i = store.annotator_for(store.add_annotator(name))["id"]
    while (x := store.next_assignment(i, overlap=3)) is not None:
        want = pair_choice[x["prompt"][0]["content"]]
        if want in ("a", "b"):
            left_is_a = x["left"].startswith("answer a")
            want = "left" if (want == "a") == left_is_a else "right"
        store.answer(i, x["assignment"], want)


def test_export_votes_soft_labels_ties_and_kto(store, tmp_path):
    store.add_pairs(_pairs(4))
    _answer_as(store, "ann", {"Q0?": "a", "Q1?": "b", "Q2?": "tie", "Q3?": "both_bad"})
    _answer_as(store, "bob", {"Q0?": "a", "Q1?": "a", "Q2?": "tie", "Q3?": "both_bad"})
    _answer_as(store, "cy", {"Q0?": "b", "Q1?": "tie", "Q2?": "a", "Q3?": "both_bad"})
    rows = {r["prompt"][0]["content"]: r for r in preference_rows(store)}
    assert set(rows) == {"Q0?", "Q2?"}  # Q1: 1-1 without ties; Q3: only both_bad
    assert rows["Q0?"]["chosen"] == "answer a0" and rows["Q0?"]["p_chosen"] == pytest.approx(2 / 3)
    assert rows["Q0?"]["votes"] == {"ann": 1.0, "bob": 1.0, "cy": 0.0}
    assert rows["Q2?"]["p_chosen"] == 1.0 and rows["Q2?"]["votes"] == {"cy": 1.0}
    assert rows["Q0?"]["chosen_gold"] == 1.0
    tied = {r["prompt"][0]["content"]: r for r in preference_rows(store, keep_ties=True)}
    assert tied["Q1?"]["p_chosen"] == pytest.approx(0.5) and tied["Q2?"]["p_chosen"] == pytest.approx((1 + 1.0) / 3)
    assert "Q3?" not in tied
    kto = unpaired_rows(list(rows.values()))
    assert [(r["completion"], r["label"]) for r in kto[:2]] == [("answer a0", True), ("answer b0", False)]
    # what tether rm reads
    from tether.data import normalise_preferences, read_rows

    out = write_jsonl(tmp_path / "prefs.jsonl", list(rows.values()))
    assert [p["p_chosen"] for p in normalise_preferences(read_rows(str(out)))] == [r["p_chosen"] for r in rows.values()]


def test_agreement_statistics_by_hand(store):
    store.add_pairs(_pairs(3))
    store.add_pairs([{"prompt": [{"role": "user", "content": "G?"}], "a": "answer a-gold", "b": "answer b-gold", "gold": "a"}])
    _answer_as(store, "ann", {"Q0?": "a", "Q1?": "a", "Q2?": "b"})
    _answer_as(store, "bob", {"Q0?": "a", "Q1?": "b", "Q2?": "b"})
    _answer_as(store, "cy", {"Q0?": "a", "Q1?": "b", "Q2?": "a"})
    # gold items: served at gold_rate 1 (first), each once per annotator
    for name, choice in (("dee", "a"), ("eve", "b")):
        i = store.annotator_for(store.add_annotator(name))["id"]
        x = store.next_assignment(i, overlap=3, gold_rate=1.0)
        assert x["prompt"][0]["content"] == "G?"
        left_is_a = x["left"] == "answer a-gold"
        store.answer(i, x["assignment"], "left" if (choice == "a") == left_is_a else "right")
    rep = agreement_report(store)
    from tether import agreement

    table = [{"ann": 1, "bob": 1, "cy": 1}, {"ann": 1, "bob": 0, "cy": 0}, {"ann": 0, "bob": 0, "cy": 1}]
    assert rep["raw_agreement"] == pytest.approx(agreement.raw_agreement(table))
    assert rep["krippendorff_alpha"] == pytest.approx(agreement.krippendorff_alpha_nominal(table))
    assert rep["cohen_kappa_pairwise"] == pytest.approx(agreement.pairwise_kappa(table))
    # by hand: 5 of the 9 annotator pairs agree; alpha = 1 - (n - 1) * D / E = 1 - 8 * 4 / 40; kappas 0.4, -0.5, 0.4
    assert rep["raw_agreement"] == pytest.approx(5 / 9)
    assert rep["krippendorff_alpha"] == pytest.approx(0.2)
    assert {tuple(k["annotators"]): round(k["kappa"], 6) for k in rep["kappa_by_pair"]} == \
        {("ann", "bob"): 0.4, ("ann", "cy"): -0.5, ("bob", "cy"): 0.4}
    assert rep["cohen_kappa_pairwise"] == pytest.approx(0.1)
    a = rep["annotators"]
    # ann: Q0 with the others (a, a), Q1 against (b, b), Q2: others split -> not counted: 1/2
    assert a["ann"]["agreement_with_majority"] == pytest.approx(0.5)
    assert a["bob"]["agreement_with_majority"] == pytest.approx(1.0)  # Q0 yes, Q1 (others a, b) split, Q2 (b, a) split
    assert a["dee"]["gold_accuracy"] == 1.0 and a["eve"]["gold_accuracy"] == 0.0 and a["ann"]["gold_items"] == 0
    assert all(0.0 <= s["picked_left"] <= 1.0 for s in a.values())
    assert "G?" not in {r["prompt"][0]["content"] for r in preference_rows(store)}  # gold items are not exported


def test_concurrent_annotators_no_lost_or_duplicated_answer(store):
    store.add_pairs(_pairs(30))
    ids = [store.annotator_for(store.add_annotator(f"a{k}"))["id"] for k in range(6)]
    errors = []

    def work(i):
        try:
            for _ in range(8):
                x = store.next_assignment(i, overlap=2)
                if x is None:
                    return
                store.answer(i, x["assignment"], "left")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    votes = store.votes()
    assert sum(len(v) for v in votes.values()) == 6 * 8  # every answer kept once
    assert all(len(v) <= 2 for v in votes.values())  # the overlap never exceeded


def test_pairs_from_label_output_and_bad_rows(tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "P?", "chosen": "yes", "rejected": "no", "chosen_gold": 1.0,
                                                "rejected_gold": 0.0, "votes": {"x": 1}}])
    items = pairs_from_file(str(f))
    assert items == [{"prompt": [{"role": "user", "content": "P?"}], "a": "yes", "b": "no", "gold": None,
                      "meta": {"chosen_gold": 1.0, "rejected_gold": 0.0}}]
    assert pairs_from_file(str(f), gold=True)[0]["gold"] == "a"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "P?", "response_a": "x"}])
    with pytest.raises(TetherError, match="bad.jsonl, row 1, field 'response_b'"):
        pairs_from_file(str(bad))
    s = Store(str(tmp_path / "db.sqlite"))
    assert s.add_pairs(items) == 1 and s.add_pairs(items) == 0  # the same pair is not added twice


def test_skip_gives_the_pair_back_and_progress(store):
    store.add_pairs(_pairs(2))
    ann, bob = (store.annotator_for(store.add_annotator(n))["id"] for n in ("ann", "bob"))
    x = store.next_assignment(ann, overlap=1)
    store.skip(ann, x["assignment"])
    y = store.next_assignment(ann, overlap=1)
    assert y["pair"] != x["pair"]  # not served to ann again
    store.answer(ann, y["assignment"], "left")
    assert store.next_assignment(ann, overlap=1) is None
    z = store.next_assignment(bob, overlap=1)
    assert z["pair"] == x["pair"]  # the skip did not use up the pair's overlap
    with pytest.raises(PermissionError):
        store.skip(ann, z["assignment"])
    p = store.progress()
    assert p["pairs"] == 2 and p["answers"] == 1 and p["annotators"]["ann"]["skipped"] == 1 and p["annotators"]["bob"]["answers"] == 0


def test_active_selection_from_a_reward_models_uncertainty(store, tmp_path):
    import torch

    from tether.annotate.commands import uncertainty_priorities
    from tether.models import load_reward_model, save_pretrained, score_conversations

    rm, tok = load_reward_model("builtin:tiny")
    folder = str(save_pretrained(rm, tok, tmp_path / "rm"))
    items = [{"prompt": [{"role": "user", "content": f"Q{i}?"}], "a": "yes " * (i + 1), "b": "no " * (3 * i + 1)} for i in range(5)]
    store.add_pairs(items)
    prio = uncertainty_priorities(store, folder)
    model, rtok = load_reward_model(folder)
    for p in store.all_pairs():
        s = score_conversations(model.eval(), rtok, [p["prompt"] + [{"role": "assistant", "content": p[k]}] for k in ("response_a", "response_b")],
                                torch.device("cpu"), torch.float32)
        want = 1 - abs(2 * torch.sigmoid(s[0] - s[1]).item() - 1)
        assert prio[p["id"]] == pytest.approx(want, abs=1e-4)
    store.set_priorities(prio)
    i = store.annotator_for(store.add_annotator("ann"))["id"]
    first = store.next_assignment(i, overlap=1)["pair"]
    assert first == max(prio, key=prio.get)  # the most uncertain pair is served first


def test_pipeline_continues_from_human_data(tmp_path):
    """A recipe stage `kind: annotate_export` turns the answers so far into ${stage.train} for the reward model."""
    import yaml

    from tether import pipeline

    db = str(tmp_path / "ann.db")
    store = Store(db)
    store.add_pairs(_pairs(4))
    for name in ("ann", "bob"):
        _answer_as(store, name, {f"Q{i}?": "a" for i in range(4)})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"out": str(tmp_path / "run"), "stages": {
        "human": {"kind": "annotate_export", "db": db, "min_pairs": 4},
        "rm": {"model": {"name": "builtin:tiny", "dtype": "fp32"}, "data": {"path": "${human.train}", "eval_fraction": 0.25},
               "train": {"max_steps": 1, "batch_size": 2, "report_to": "none", "save_every": 0}}}}))
    assert pipeline.run(str(recipe), report=False) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "human" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["p_chosen"] == 1.0 for r in rows)
    assert (tmp_path / "run" / "rm" / "model" / "config.json").is_file()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"out": str(tmp_path / "run2"), "stages": {"human": {"kind": "annotate_export", "db": db,
                                                                                     "min_pairs": 10}}}))
    with pytest.raises(TetherError, match="4 pairs have a preference, fewer than min_pairs=10"):
        pipeline.run(str(bad), report=False)
