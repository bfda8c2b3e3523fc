import json
import logging

import pytest
import torch

from conftest import chat, write_jsonl
from tether import data as D
from tether.errors import TetherError
from tether.models import load_causal_lm


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_completion_only_mask_exact(tok):
    ex = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}]}
    out = D.tokenize_sft(tok, ex)
    prefix = ids(tok, D.render(tok, ex["messages"][:1], add_generation_prompt=True))
    answer = ids(tok, "Hello! How can I help?")
    nl = ids(tok, "\n")
    # prompt tokens untrained; the answer and its closing <|im_end|> trained; the template's newline after it not
    assert out["input_ids"] == prefix + answer + [tok.eos_token_id] + nl
    assert out["loss_mask"] == [0] * len(prefix) + [1] * (len(answer) + 1) + [0] * len(nl)


def test_mask_multi_turn_trains_every_assistant_turn_only(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "One?"}, {"role": "assistant", "content": "Uno."},
            {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "Dos."}]
    out = D.tokenize_sft(tok, {"messages": msgs})
    trained = tok.decode([t for t, m in zip(out["input_ids"], out["loss_mask"]) if m])
    assert trained == "Uno.<|im_end|>Dos.<|im_end|>"
    assert "Be brief" not in trained and "Two?" not in trained


def test_prompt_completion_equals_messages(tok, tmp_path):
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Hi there", "completion": "Hello!"}])
    ms = write_jsonl(tmp_path / "ms.jsonl", [chat("Hi there", "Hello!")])
    a = D.prepare_sft(tok, D.read_rows(str(pc)), 512, "error")[0]
    b = D.prepare_sft(tok, D.read_rows(str(ms)), 512, "error")[0]
    assert a["input_ids"] == b["input_ids"] and a["loss_mask"] == b["loss_mask"]


def test_text_format_trains_every_token_and_eos(tok, tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "plain language modelling"}])
    ex = D.prepare_sft(tok, D.read_rows(str(f)), 512, "error")[0]
    assert ex["input_ids"] == ids(tok, "plain language modelling") + [tok.eos_token_id]
    assert all(ex["loss_mask"])


@pytest.mark.parametrize("kind", ["json", "csv", "parquet", "datasets"])
def test_reads_every_file_kind(tok, tmp_path, kind):
    rows = [{"prompt": f"Q{i}", "completion": f"A{i}"} for i in range(3)]
    if kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(rows))
    elif kind == "csv":
        path = tmp_path / "d.csv"
        path.write_text("prompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n" for r in rows))
    else:
        import datasets

        ds = datasets.Dataset.from_list(rows)
        path = tmp_path / ("d.parquet" if kind == "parquet" else "folder")
        ds.to_parquet(str(path)) if kind == "parquet" else ds.save_to_disk(str(path))
    got = D.normalise_sft(D.read_rows(str(path)))
    assert [m["messages"][-1]["content"] for m in got] == ["A0", "A1", "A2"]


def test_csv_cells_become_labels_and_numbers(tmp_path):
    """KTO labels and vote shares from a CSV file arrive typed; what does not parse is still an error."""
    path = tmp_path / "kto.csv"
    path.write_text("prompt,completion,label\nQ0,A0,true\nQ1,A1,False\nQ2,A2,1\n")
    assert [r["label"] for r in D.normalise_unpaired(D.read_rows(str(path)))] == [True, False, True]
    path.write_text("prompt,chosen,rejected,p_chosen,margin\nQ0,a,b,0.8,\nQ1,a,b,,2\n")
    got = D.normalise_preferences(D.read_rows(str(path)))
    assert [(r["p_chosen"], r["margin"]) for r in got] == [(0.8, None), (None, 2.0)]
    path.write_text("prompt,completion,label\nQ0,A0,maybe\n")
    with pytest.raises(TetherError, match="field 'label': must be true or false"):
        D.normalise_unpaired(D.read_rows(str(path)))


def test_builtin_demos_are_valid_and_large_enough(tok):
    rows = D.read_rows("builtin:demos")
    assert len(rows.rows) >= 200
    cats = {r["category"] for r in rows.rows}
    assert {"instruction", "qa", "creative", "coding", "refusal"} <= cats
    examples = D.prepare_sft(tok, rows, 512, "error")  # every row valid, none over 512 tokens
    assert len(examples) == len(rows.rows)


# --- validation errors: one clear message naming file, row and field ----------------------------

def _err(tmp_path, lines, tok, name="bad.jsonl", max_length=512, policy="error"):
    p = tmp_path / name
    p.write_text("".join(lines))
    with pytest.raises(TetherError) as e:
        D.prepare_sft(tok, D.read_rows(str(p)), max_length, policy)
    return str(e.value)


def test_error_missing_column(tok, tmp_path):
    lines = [json.dumps({"prompt": "a", "completion": "b"}) + "\n", json.dumps({"prompt": "c"}) + "\n"]
    assert _err(tmp_path, lines, tok) == f"{tmp_path / 'bad.jsonl'}, row 2, field 'completion': missing column (the first row uses the prompt/completion format)"


def test_error_empty_completion(tok, tmp_path):
    lines = [json.dumps({"prompt": "a", "completion": "b"}) + "\n", "\n", json.dumps({"prompt": "c", "completion": "  "}) + "\n"]
    # blank lines are skipped but counted: the bad row is line 3 of the file
    assert _err(tmp_path, lines, tok).endswith("bad.jsonl, row 3, field 'completion': empty completion")


def test_error_wrong_type(tok, tmp_path):
    msg = _err(tmp_path, [json.dumps({"prompt": "a", "completion": 7}) + "\n"], tok)
    assert msg.endswith("row 1, field 'completion': expected a string, got int")
    msg = _err(tmp_path, [json.dumps({"messages": [{"role": "user", "content": 3}]}) + "\n"], tok)
    assert "row 1, field 'messages': message 0 content must be a string, got int" in msg
    msg = _err(tmp_path, [json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n"], tok)
    assert "unknown role 'robot'" in msg
    msg = _err(tmp_path, [json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n"], tok)
    assert msg.endswith("row 1, field 'messages': no assistant message to learn from")


def test_error_invalid_json(tok, tmp_path):
    lines = [json.dumps({"text": "fine"}) + "\n", '{"text": "broken\n']
    assert "bad.jsonl, row 2: invalid JSON" in _err(tmp_path, lines, tok)


def test_error_unknown_format_and_missing_file(tok, tmp_path):
    assert "cannot tell the data format from its columns ['foo']" in _err(tmp_path, [json.dumps({"foo": 1}) + "\n"], tok)
    with pytest.raises(TetherError, match="data file not found"):
        D.read_rows(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(TetherError, match="unsupported data file type '.txt'"):
        D.read_rows(str(tmp_path / "x.txt"))


def test_overlong_policies(tok, tmp_path, caplog):
    rows = [chat("short", "yes"), chat("long " * 50, "no " * 50), chat("tiny", "ok")]
    p = write_jsonl(tmp_path / "o.jsonl", rows)
    msg = _err(tmp_path, [p.read_text()], tok, max_length=64)
    assert "row 2: " in msg and "over max_length=64 (1 rows in all)" in msg and "data.overlong" in msg
    with caplog.at_level(logging.WARNING, logger="tether"):
        kept = D.prepare_sft(tok, D.read_rows(str(p)), 64, "drop")
    assert [e["row"] for e in kept] == [1, 3]
    assert "1 of 3 rows are longer than max_length=64 tokens; policy 'drop'" in caplog.text
    truncated = D.prepare_sft(tok, D.read_rows(str(p)), 64, "truncate")
    assert len(truncated) == 2  # row 2 is cut inside its prompt, so nothing trainable remains: dropped
    assert max(len(e["input_ids"]) for e in truncated) <= 64


# --- packing --------------------------------------------------------------------------------------

def test_packing_boundaries_and_no_cross_attention(tok):
    exs = [D.tokenize_sft(tok, chat(f"Question {q}?", a)) for q, a in [(1, "Short."), (2, "A longer answer here."), (3, "Mid one.")]]
    max_len = sum(len(e["input_ids"]) for e in exs)
    packed = D.pack(exs, max_len)
    assert len(packed) == 1
    row = packed[0]
    # segments in first-fit-decreasing order; positions restart; the first token of each segment untrained
    order = sorted(exs, key=lambda e: -len(e["input_ids"]))
    starts = [0]
    for e in order[:-1]:
        starts.append(starts[-1] + len(e["input_ids"]))
    assert [row["position_ids"][s] for s in starts] == [0, 0, 0]
    assert all(row["loss_mask"][s] == 0 for s in starts)
    assert row["input_ids"] == sum((e["input_ids"] for e in order), [])
    assert sum(row["loss_mask"]) == sum(sum(e["loss_mask"][1:]) for e in order)

    model = load_causal_lm("builtin:tiny").eval()
    batch = D.collate(packed + D.pack([order[2]], max_len), tok.pad_token_id)  # a second, shorter packed row: padding too
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits
        for e, s in zip(order, starts):
            alone = model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
            assert torch.allclose(packed_logits[0, s : s + len(e["input_ids"])], alone, atol=1e-5)
    assert torch.isfinite(packed_logits).all()


def test_collate_masks_come_from_lengths_not_pad_id(tok):
    # the answer ends with <|im_end|>, which is also the pad id: it must stay trained and attended
    a = D.tokenize_sft(tok, chat("x", "y"))
    b = D.tokenize_sft(tok, chat("a much longer prompt here", "and a longer reply"))
    batch = D.collate([a, b], tok.pad_token_id)
    n_a = len(a["input_ids"])
    assert batch["attention_mask"][0].tolist() == [1] * n_a + [0] * (batch["input_ids"].shape[1] - n_a)
    assert batch["loss_mask"][0, :n_a].tolist() == a["loss_mask"]
    eos_positions = (batch["input_ids"][0] == tok.eos_token_id).nonzero().flatten().tolist()
    assert any(batch["loss_mask"][0, p] == 1 for p in eos_positions if p < n_a)
