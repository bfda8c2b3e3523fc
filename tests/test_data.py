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


# --- unreadable input: one line naming the file and, where there is one, the row or line ---------

def _read_err(path) -> str:
    with pytest.raises(TetherError) as e:
        D.read_rows(str(path))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_invalid_utf8_names_row_and_column(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "ok"}\n\n{"text": "caf\xc3\xa9 \xff"}\n')  # blank lines count; the column counts é once
    assert _read_err(p) == f"{p}, row 3: not valid UTF-8 (byte 0xff at column 16)"
    p = tmp_path / "bad.json"
    p.write_bytes(b'[\n  {"text": "a\xff"}\n]\n')
    assert _read_err(p) == f"{p}, line 2: not valid UTF-8 (byte 0xff at column 14)"
    p = tmp_path / "bad.csv"
    p.write_bytes(b"prompt,completion\nQ0,A0\nQ1,A\x80\n")
    assert _read_err(p) == f"{p}, row 3: not valid UTF-8 (byte 0x80 at column 5)"


def test_utf8_bom_is_dropped(tmp_path):
    """Spreadsheets start their CSV with a byte-order mark; it is not part of the first column's name."""
    p = tmp_path / "bom.csv"
    p.write_bytes(b"\xef\xbb\xbfprompt,completion\nQ,A\n")
    assert D.read_rows(str(p)).rows == [{"prompt": "Q", "completion": "A"}]
    p.write_bytes(b"\xef\xbb\xbfprompt,completion\n\xfe,A\n")
    assert _read_err(p) == f"{p}, row 2: not valid UTF-8 (byte 0xfe at column 1)"


def _expect_errors(path, cases):
    """Write each content to `path` and check the one-line error that reading it gives ({p} = the path)."""
    for content, want in cases:
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        assert _read_err(path) == want.format(p=path), content


def test_truncated_and_non_object_json_rows(tmp_path):
    _expect_errors(tmp_path / "cut.jsonl", [
        ('{"text": "fine"}\n{"text": "fi',
         "{p}, row 2: invalid JSON (Unterminated string starting at column 10; the file ends inside this row: truncated?)"),
        ('{"text": "fine"}\n{"text": "fine" "more"}\n', "{p}, row 2: invalid JSON (Expecting ',' delimiter at column 17)"),
        ('{"text": "fine"}\n[1, 2]\n', "{p}, row 2: expected a JSON object, got list"),
        ("\n", "{p}: no rows"),
    ])


def test_json_file_errors(tmp_path):
    _expect_errors(tmp_path / "d.json", [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "{p}, line 1: not valid UTF-8 (byte 0x89 at column 1)"),  # an image
        ('[{"text": "a"},\n {"te', "{p}, line 2: invalid JSON (Unterminated string starting at column 3)"),
        ('{"text": "a"}', "{p}: expected a JSON list of objects (or JSON Lines in a .jsonl file), got dict"),
        ("42", "{p}: expected a JSON list of objects (or JSON Lines in a .jsonl file), got int"),
        ('{"data": [{"text": "a"}, 3]}', "{p}, row 2: expected a JSON object, got int"),
    ])


def test_csv_structure_errors(tmp_path, tok):
    p = tmp_path / "d.csv"
    p.write_text("prompt,completion\nHello, world,Hi\n")
    assert _read_err(p) == f"{p}, row 2: 3 cells but the header has 2 columns (quote cells that contain commas)"
    p.write_text("prompt,completion\nq,a\n\"" + "x" * 200_000 + "\",b\n")
    assert _read_err(p) == f"{p}, row 3: unreadable CSV (field larger than field limit (131072))"
    p.write_text("prompt,completion\n")
    assert _read_err(p) == f"{p}: no rows"
    # rows are numbered by the line they end on: blank lines and quoted line breaks count
    p.write_text('prompt,completion\nQ0,A0\n\nQ1,"A\nB"\nQ2,\n')
    with pytest.raises(TetherError) as e:
        D.normalise_sft(D.read_rows(str(p)))
    assert str(e.value) == f"{p}, row 6, field 'completion': empty completion"


def test_unreadable_parquet(tmp_path):
    import datasets

    good = tmp_path / "good.parquet"
    datasets.Dataset.from_list([{"prompt": f"Q{i}", "completion": f"A{i}"} for i in range(50)]).to_parquet(str(good))
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PK\x03\x04 not a parquet file at all")
    for p in (cut, garbage):
        assert _read_err(p).startswith(f"{p}: not a readable Parquet file (ArrowInvalid: ")
    empty = tmp_path / "empty.parquet"
    datasets.Dataset.from_dict({"prompt": [], "completion": []}).to_parquet(str(empty))
    assert _read_err(empty) == f"{empty}: no rows"


def test_unreadable_datasets_folder(tmp_path):
    import datasets

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hello")
    assert _read_err(other).startswith(f"{other}: not a readable datasets folder saved with save_to_disk (FileNotFoundError: ")
    ds = datasets.Dataset.from_list([{"prompt": f"Q{i}", "completion": f"A{i}"} for i in range(50)])
    state = tmp_path / "state"
    ds.save_to_disk(str(state))
    (state / "state.json").write_bytes(b"\x00\xff\xfe")
    assert _read_err(state).startswith(f"{state}: not a readable datasets folder saved with save_to_disk (UnicodeDecodeError: ")
    cut = tmp_path / "cut"
    ds.save_to_disk(str(cut))
    (arrow,) = cut.glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    assert _read_err(cut).startswith(f"{cut}: not a readable datasets folder saved with save_to_disk (")


@pytest.mark.parametrize("command", ["sft", "rm", "dpo", "kto", "orpo", "eval-rm"])
def test_cli_bad_bytes_exit_2_and_write_nothing(tmp_path, capsys, command):
    """Every stage reads and checks its data before it creates --out: a bad file leaves no run folder."""
    from tether.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "\xff"}\n')
    out = tmp_path / "out"
    code = main([command, "--model", "builtin:tiny", "--data", str(bad), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == f"tether: error: {bad}, row 2: not valid UTF-8 (byte 0xff at column 13)"
    assert not out.exists()


# --- CSV cells: JSON only where a message list may be ---------------------------------------------

def _write_csv(path, header, rows):
    import csv

    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def test_csv_parses_json_only_for_message_lists(tmp_path):
    system_user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    p = _write_csv(tmp_path / "d.csv", ["prompt", "completion", "note"], [
        ["List it", "[1, 2, 3] is a list", "[x]"],
        ["Just the list", "[1, 2, 3]", "[1, 2]"],
        [json.dumps(system_user), "Hello", "[]"],
    ])
    rows = D.read_rows(str(p))
    assert [r["note"] for r in rows.rows] == ["[x]", "[1, 2]", "[]"]
    assert [g["messages"] for g in D.normalise_sft(rows)] == [
        [{"role": "user", "content": "List it"}, {"role": "assistant", "content": "[1, 2, 3] is a list"}],
        [{"role": "user", "content": "Just the list"}, {"role": "assistant", "content": "[1, 2, 3]"}],
        system_user + [{"role": "assistant", "content": "Hello"}],
    ]


# --- prompt-only data (RL) ------------------------------------------------------------------------

def test_prompts_strings_messages_and_meta(tmp_path):
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye?"}]
    p = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "a", "prompt": "Name a colour.", "level": 2},
        {"prompt": convo[:2]},
        {"messages": convo},
        {"prompt": "Why?", "messages": convo + [{"role": "assistant", "content": "Bye."}]},
    ])
    assert D.normalise_prompts(D.read_rows(str(p))) == [
        {"messages": [{"role": "user", "content": "Name a colour."}], "row": 1, "meta": {"id": "a", "level": 2}},
        {"messages": convo[:2], "row": 2, "meta": {}},
        {"messages": convo, "row": 3, "meta": {}},
        {"messages": [{"role": "user", "content": "Why?"}], "row": 4,
         "meta": {"messages": convo + [{"role": "assistant", "content": "Bye."}]}},
    ]


def test_prompts_from_csv_parquet_and_datasets_folder(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    p = _write_csv(tmp_path / "p.csv", ["id", "prompt"], [["x1", json.dumps(msgs)], ["x2", "Plain text"]])
    assert D.normalise_prompts(D.read_rows(str(p))) == [
        {"messages": msgs, "row": 2, "meta": {"id": "x1"}},
        {"messages": [{"role": "user", "content": "Plain text"}], "row": 3, "meta": {"id": "x2"}},
    ]
    p = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": 1, "prompt": msgs}, {"id": 2, "prompt": msgs[1:]}]), p)
    assert D.normalise_prompts(D.read_rows(str(p))) == [
        {"messages": msgs, "row": 1, "meta": {"id": 1}}, {"messages": msgs[1:], "row": 2, "meta": {"id": 2}},
    ]
    p = tmp_path / "folder"
    datasets.Dataset.from_list([{"prompt": "Q0", "tag": "t"}, {"prompt": "Q1", "tag": "u"}]).save_to_disk(str(p))
    assert D.normalise_prompts(D.read_rows(str(p))) == [
        {"messages": [{"role": "user", "content": "Q0"}], "row": 1, "meta": {"tag": "t"}},
        {"messages": [{"role": "user", "content": "Q1"}], "row": 2, "meta": {"tag": "u"}},
    ]


def _prompt_err(tmp_path, row) -> str:
    p = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, row])
    with pytest.raises(TetherError) as e:
        D.normalise_prompts(D.read_rows(str(p)))
    return str(e.value).removeprefix(f"{p}, row 2, ")


@pytest.mark.parametrize("value, kind", [(7, "int"), (True, "bool"), (None, "NoneType"), ({"text": "x"}, "dict")])
def test_prompt_of_the_wrong_type(tmp_path, value, kind):
    assert _prompt_err(tmp_path, {"prompt": value}) == f"field 'prompt': expected a string or a list of messages, got {kind}"


def test_prompt_errors(tmp_path):
    assert _prompt_err(tmp_path, {"id": 3, "question": "x"}) == (
        "field 'prompt': missing column (prompt data needs 'prompt' or 'messages'; the columns are ['id', 'question'])")
    assert _prompt_err(tmp_path, {"prompt": " \n"}) == "field 'prompt': empty prompt"
    assert _prompt_err(tmp_path, {"prompt": [{"role": "user", "content": "  "}]}) == "field 'prompt': empty prompt"
    answered = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    for field in ("prompt", "messages"):
        assert _prompt_err(tmp_path, {field: answered}) == (
            f"field '{field}': the last message is the assistant's; a prompt ends where the model is to answer")
    assert _prompt_err(tmp_path, {"messages": "Hi"}) == "field 'messages': expected a non-empty list of messages, got str"
    assert _prompt_err(tmp_path, {"prompt": [{"role": "robot", "content": "x"}]}).startswith(
        "field 'prompt': message 0 has unknown role 'robot'")


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
