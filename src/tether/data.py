"""Data: reading files, the ecosystem's formats, validation with clear errors, tokenisation, collation.

Formats (as in TRL and the Hugging Face hub):
  messages            {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}
  prompt/completion   {"prompt": str | messages, "completion": str | messages}
  text                {"text": str}  (language modelling on every token)
  prompt only (RL)    {"prompt": str | messages} or {"messages": the conversation so far}

Every row is validated before any training starts. A bad row raises one TetherError naming the file,
the 1-based row number and the field; the CLI turns it into a one-line message and exit code 2.
Masks are always built from lengths and spans, never from the pad id (SmolLM2's pad is its EOS).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from tether.errors import TetherError

log = logging.getLogger("tether")

BUILTIN_DATA = {"builtin:demos": "demos.jsonl"}
ROLES = ("system", "user", "assistant", "tool")


# --------------------------------------------------------------------------------------------------
# Reading


@dataclass
class Rows:
    """Rows of a data source, with the name used in error messages and each row's 1-based number."""

    source: str
    rows: list[dict]
    numbers: list[int]

    def where(self, i: int, field: str | None = None) -> str:
        return f"{self.source}, row {self.numbers[i]}" + (f", field '{field}'" if field else "")


def write_jsonl(path, rows) -> None:
    """Rows as JSON Lines (UTF-8, one object per line), the file replaced in one write."""
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def read_rows(path: str) -> Rows:
    """Read JSONL, JSON (a list of objects), Parquet, CSV, a `datasets` folder, or a builtin data set.

    Input that cannot be read (not UTF-8, truncated, binary, not the kind of file its name says) is a
    TetherError naming the file and, where there is one, the row or line, like any bad row.
    """
    if path in BUILTIN_DATA:
        with resources.as_file(resources.files("tether.assets") / BUILTIN_DATA[path]) as p:
            return _checked(_read_jsonl(p, path))
    p = Path(path).expanduser()
    if not p.exists():
        raise TetherError(f"data file not found: {path}")
    if p.is_dir():
        return _checked(_read_datasets_folder(p))
    suffix = p.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}
    if suffix not in readers:
        raise TetherError(f"{p}: unsupported data file type '{suffix}' (use .jsonl, .json, .parquet, .csv or a datasets folder)")
    return _checked(readers[suffix](p, str(p)))


def _decoded(p: Path, source: str, unit: str) -> str:
    """The text of a file, a leading BOM dropped (spreadsheets write one). Bytes that are not UTF-8 stop
    here, naming the line of the first bad byte (as `unit`: 'row' where rows are lines) and its column."""
    try:
        return p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # e.object is the file without its BOM; everything before e.start is valid UTF-8
        lines = re.split(r"\r\n|\r|\n", e.object[: e.start].decode("utf-8"))
        raise TetherError(f"{source}, {unit} {len(lines)}: not valid UTF-8 "
                          f"(byte 0x{e.object[e.start]:02x} at column {len(lines[-1]) + 1})") from None


def _reason(e: Exception) -> str:
    """A library's exception as one line, for a message about a file it could not read."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _json_error(e: json.JSONDecodeError) -> str:
    # some messages end in " at" ("Unterminated string starting at"), written to precede a position
    return f"{e.msg.removesuffix(' at')} at column {e.colno}"


def _read_jsonl(p: Path, source: str) -> Rows:
    rows, numbers = [], []
    for n, line in enumerate(io.StringIO(_decoded(p, source, "row"), newline=""), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            # only the last line of a file can lack its newline: a download cut short ends that way
            cut = "" if line.endswith(("\n", "\r")) else "; the file ends inside this row: truncated?"
            raise TetherError(f"{source}, row {n}: invalid JSON ({_json_error(e)}{cut})") from None
        numbers.append(n)
    return Rows(source, rows, numbers)


def _read_json(p: Path, source: str) -> Rows:
    try:
        data = json.loads(_decoded(p, source, "line"))
    except json.JSONDecodeError as e:
        raise TetherError(f"{source}, line {e.lineno}: invalid JSON ({_json_error(e)})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise TetherError(f"{source}: expected a JSON list of objects (or JSON Lines in a .jsonl file), got {type(data).__name__}")
    return Rows(source, data, list(range(1, len(data) + 1)))


def _read_parquet(p: Path, source: str) -> Rows:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        data = pq.read_table(p).to_pylist()
    except (pyarrow.ArrowException, OSError, ValueError) as e:  # ValueError: also text columns that are not UTF-8
        raise TetherError(f"{source}: not a readable Parquet file ({_reason(e)})") from None
    return Rows(source, data, list(range(1, len(data) + 1)))


def _read_csv(p: Path, source: str) -> Rows:
    """Each row is numbered by the line it ends on: the header is row 1, and a file without quoted
    line breaks has data row i on line i + 1 (blank lines are skipped but counted, as in JSONL)."""
    reader = csv.DictReader(io.StringIO(_decoded(p, source, "row"), newline=""))
    rows, numbers = [], []
    try:
        for r in reader:
            if None in r:  # DictReader files surplus cells under None: an unquoted comma split a cell
                raise TetherError(f"{source}, row {reader.line_num}: {len(reader.fieldnames) + len(r[None])} cells but the "
                                  f"header has {len(reader.fieldnames)} columns (quote cells that contain commas)")
            rows.append(_decode_csv_cells(r))
            numbers.append(reader.line_num)
    except csv.Error as e:
        raise TetherError(f"{source}, row {numbers[-1] + 1 if numbers else 2}: unreadable CSV ({e})") from None
    return Rows(source, rows, numbers)


def _read_datasets_folder(p: Path) -> Rows:
    import datasets
    import pyarrow

    try:
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise TetherError(f"{p}: a DatasetDict without a 'train' split (splits: {', '.join(ds)})")
            ds = ds["train"]
        data = ds.to_list()
    # what a missing, truncated or garbled file of the folder raises inside `datasets` and pyarrow
    except (OSError, ValueError, LookupError, TypeError, pyarrow.ArrowException) as e:
        raise TetherError(f"{p}: not a readable datasets folder saved with save_to_disk ({_reason(e)})") from None
    return Rows(str(p), data, list(range(1, len(data) + 1)))


MESSAGE_COLUMNS = ("messages", "prompt", "completion", "chosen", "rejected")


def _decode_csv_cells(row: dict) -> dict:
    """CSV has only text. Message lists travel as JSON text, so a cell of a column that may hold one
    (MESSAGE_COLUMNS) becomes a list when it parses as a non-empty JSON list of objects; any other text,
    such as the answer '[1, 2, 3]', stays text. KTO's label arrives as true/false (or 1/0), the numeric
    columns p_chosen and margin as numbers, an empty cell meaning absent. Anything else that does not
    parse is left as text, for validation to name."""
    out = {}
    for k, v in row.items():
        if k in MESSAGE_COLUMNS and isinstance(v, str) and v.lstrip().startswith("["):
            try:
                parsed = json.loads(v)
            except json.JSONDecodeError:
                parsed = None
            if isinstance(parsed, list) and parsed and all(isinstance(m, dict) for m in parsed):
                v = parsed
        elif k == "label" and isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0"):
            v = v.strip().lower() in ("true", "1")
        elif k in ("p_chosen", "margin") and isinstance(v, str):
            try:
                v = float(v) if v.strip() else None
            except ValueError:
                pass
        out[k] = v
    return out


def _checked(rows: Rows) -> Rows:
    for i, r in enumerate(rows.rows):
        if not isinstance(r, dict):
            raise TetherError(f"{rows.where(i)}: expected a JSON object, got {type(r).__name__}")
    if not rows.rows:
        raise TetherError(f"{rows.source}: no rows")
    return rows


# --------------------------------------------------------------------------------------------------
# Validation and normalisation


def _messages(value, rows: Rows, i: int, field: str, *, need_assistant: bool) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise TetherError(f"{rows.where(i, field)}: expected a non-empty list of messages, got {type(value).__name__}")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TetherError(f"{rows.where(i, field)}: message {j} needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise TetherError(f"{rows.where(i, field)}: message {j} has unknown role {m['role']!r} (use {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise TetherError(f"{rows.where(i, field)}: message {j} content must be a string, got {type(m['content']).__name__}")
        if m["role"] == "assistant" and not m["content"].strip():
            raise TetherError(f"{rows.where(i, field)}: message {j} is an empty assistant message")
        out.append({"role": m["role"], "content": m["content"]})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise TetherError(f"{rows.where(i, field)}: no assistant message to learn from")
    return out


def _text(value, rows: Rows, i: int, field: str) -> str:
    if not isinstance(value, str):
        raise TetherError(f"{rows.where(i, field)}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise TetherError(f"{rows.where(i, field)}: empty {field}")
    return value


def sft_format(rows: Rows) -> str:
    first = rows.rows[0]
    for fmt, keys in (("messages", ("messages",)), ("prompt_completion", ("prompt", "completion")), ("text", ("text",))):
        if all(k in first for k in keys):
            return fmt
    raise TetherError(
        f"{rows.where(0)}: cannot tell the data format from its columns {sorted(first)}; "
        "SFT data needs 'messages', 'prompt' and 'completion', or 'text'"
    )


def normalise_sft(rows: Rows) -> list[dict]:
    """Validate every row; return examples as {'messages': [...]} or {'text': str}."""
    fmt = sft_format(rows)
    out = []
    for i, r in enumerate(rows.rows):
        if fmt == "messages":
            if "messages" not in r:
                raise TetherError(f"{rows.where(i, 'messages')}: missing column (the first row uses the messages format)")
            out.append({"messages": _messages(r["messages"], rows, i, "messages", need_assistant=True)})
        elif fmt == "prompt_completion":
            for k in ("prompt", "completion"):
                if k not in r:
                    raise TetherError(f"{rows.where(i, k)}: missing column (the first row uses the prompt/completion format)")
            prompt = r["prompt"]
            if isinstance(prompt, list):
                prompt = _messages(prompt, rows, i, "prompt", need_assistant=False)
            else:
                prompt = [{"role": "user", "content": _text(prompt, rows, i, "prompt")}]
            completion = r["completion"]
            if isinstance(completion, list):
                completion = _messages(completion, rows, i, "completion", need_assistant=True)
            else:
                completion = [{"role": "assistant", "content": _text(completion, rows, i, "completion")}]
            out.append({"messages": prompt + completion})
        else:
            if "text" not in r:
                raise TetherError(f"{rows.where(i, 'text')}: missing column (the first row uses the text format)")
            out.append({"text": _text(r["text"], rows, i, "text")})
    return out


def _side(value, rows: Rows, i: int, field: str) -> list[dict]:
    """A chosen/rejected value: a string (one assistant message) or a message list."""
    if isinstance(value, list):
        return _messages(value, rows, i, field, need_assistant=True)
    return [{"role": "assistant", "content": _text(value, rows, i, field)}]


def _require(r: dict, keys: tuple, rows: Rows, i: int, hint: str) -> None:
    for k in keys:
        if k not in r:
            raise TetherError(f"{rows.where(i, k)}: missing column ({hint})")


def _prompt(value, rows: Rows, i: int) -> list[dict]:
    """A 'prompt' value: a string (one user message) or a message list."""
    if isinstance(value, list):
        return _messages(value, rows, i, "prompt", need_assistant=False)
    return [{"role": "user", "content": _text(value, rows, i, "prompt")}]


def _probability(r: dict, rows: Rows, i: int, field: str) -> float | None:
    if field not in r or r[field] is None:
        return None
    v = r[field]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise TetherError(f"{rows.where(i, field)}: must be a number, got {v!r}")
    if field == "p_chosen" and not 0.0 <= v <= 1.0:
        raise TetherError(f"{rows.where(i, field)}: must be in [0, 1], got {v}")
    return float(v)


def normalise_preferences(rows: Rows) -> list[dict]:
    """Validate pairwise preference rows; return {'prompt', 'chosen', 'rejected'} as message lists
    plus 'p_chosen' and 'margin' (None when absent) and the source row number.

    Explicit prompt: a 'prompt' column (string or messages) and the responses in chosen/rejected.
    Implicit prompt: chosen and rejected are whole conversations; their shared leading messages are
    the prompt (as in TRL).
    """
    out = []
    for i, r in enumerate(rows.rows):
        for k in ("chosen", "rejected"):
            if k not in r:
                raise TetherError(f"{rows.where(i, k)}: missing column (preference data needs 'chosen' and 'rejected')")
        chosen, rejected = _side(r["chosen"], rows, i, "chosen"), _side(r["rejected"], rows, i, "rejected")
        if "prompt" in r:
            prompt = _prompt(r["prompt"], rows, i)
        else:
            if not (isinstance(r["chosen"], list) and isinstance(r["rejected"], list)):
                raise TetherError(f"{rows.where(i, 'prompt')}: missing column (without 'prompt', chosen and rejected must be message lists)")
            n = 0
            while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
                n += 1
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if chosen == rejected:
            raise TetherError(f"{rows.where(i, 'chosen')}: chosen and rejected are identical")
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "row": rows.numbers[i],
                    "p_chosen": _probability(r, rows, i, "p_chosen"), "margin": _probability(r, rows, i, "margin")})
    return out


def normalise_comparisons(rows: Rows) -> list[dict]:
    """Validate pairs to be judged (an AI labeller, an annotation app); return {'prompt' (messages),
    'a', 'b' (message lists), 'row', 'meta' (every other column)}. Either 'response_a' / 'response_b'
    with a 'prompt', or preference rows (chosen/rejected, explicit or implicit prompt, as
    `normalise_preferences` reads them), whose chosen becomes 'a'; their labels are not used."""
    if "response_a" not in rows.rows[0] and "response_b" not in rows.rows[0]:
        out = []
        for p, r in zip(normalise_preferences(rows), rows.rows):
            meta = {k: v for k, v in r.items() if k not in ("prompt", "chosen", "rejected")}
            out.append({"prompt": p["prompt"], "a": p["chosen"], "b": p["rejected"], "row": p["row"], "meta": meta})
        return out
    out = []
    for i, r in enumerate(rows.rows):
        _require(r, ("prompt", "response_a", "response_b"), rows, i,
                 "pairs need 'prompt', 'response_a' and 'response_b', or 'chosen' and 'rejected'")
        prompt = _prompt(r["prompt"], rows, i)
        a, b = _side(r["response_a"], rows, i, "response_a"), _side(r["response_b"], rows, i, "response_b")
        if a == b:
            raise TetherError(f"{rows.where(i, 'response_a')}: response_a and response_b are identical")
        meta = {k: v for k, v in r.items() if k not in ("prompt", "response_a", "response_b")}
        out.append({"prompt": prompt, "a": a, "b": b, "row": rows.numbers[i], "meta": meta})
    return out


def normalise_unpaired(rows: Rows) -> list[dict]:
    """Validate unpaired (KTO) rows; return {'prompt', 'completion'} as message lists, 'label' (bool:
    is the completion desirable) and the source row number.

    Unpaired rows: 'prompt' (string or messages), 'completion' (string or messages), 'label' (true or
    false). Pairwise preference rows (chosen/rejected, as `normalise_preferences` reads them) are
    unpaired instead: the chosen response becomes a desirable example, the rejected one an
    undesirable example of the same prompt.
    """
    if "chosen" in rows.rows[0] or "rejected" in rows.rows[0]:
        out = []
        for p in normalise_preferences(rows):
            for side, label in (("chosen", True), ("rejected", False)):
                out.append({"prompt": p["prompt"], "completion": p[side], "label": label, "row": p["row"], "p_chosen": p["p_chosen"]})
        return out
    out = []
    for i, r in enumerate(rows.rows):
        _require(r, ("prompt", "completion", "label"), rows, i,
                 "unpaired data needs 'prompt', 'completion' and 'label'; pairwise data needs 'chosen' and 'rejected'")
        prompt = _prompt(r["prompt"], rows, i)
        completion = _side(r["completion"], rows, i, "completion")
        if not isinstance(r["label"], bool):
            raise TetherError(f"{rows.where(i, 'label')}: must be true or false (is the completion desirable?), got {r['label']!r}")
        out.append({"prompt": prompt, "completion": completion, "label": r["label"], "row": rows.numbers[i], "p_chosen": None})
    return out


def normalise_prompts(rows: Rows) -> list[dict]:
    """Validate prompt-only rows (what RL samples responses to); return {'messages': the prompt as a
    message list, 'row': the source row number, 'meta': every other column of the row}.

    The prompt is a 'prompt' column (a string, one user message, or a message list) or, without one, a
    'messages' column holding the conversation so far. Either way the last message must not be the
    assistant's: answering is the model's turn. With both columns, 'prompt' is the prompt and 'messages'
    (in some hub data sets the whole conversation, answer included) is kept as metadata.
    """
    out = []
    for i, r in enumerate(rows.rows):
        field = "prompt" if "prompt" in r else "messages" if "messages" in r else None
        if field is None:
            raise TetherError(f"{rows.where(i, 'prompt')}: missing column (prompt data needs 'prompt' or 'messages'; "
                              f"the columns are {sorted(r)})")
        v = r[field]
        if isinstance(v, list) or field == "messages":
            messages = _messages(v, rows, i, field, need_assistant=False)
        elif isinstance(v, str):
            messages = [{"role": "user", "content": v}]
        else:
            raise TetherError(f"{rows.where(i, field)}: expected a string or a list of messages, got {type(v).__name__}")
        if not any(m["content"].strip() for m in messages):
            raise TetherError(f"{rows.where(i, field)}: empty prompt")
        if messages[-1]["role"] == "assistant":
            raise TetherError(f"{rows.where(i, field)}: the last message is the assistant's; a prompt ends where the model is to answer")
        out.append({"messages": messages, "row": rows.numbers[i], "meta": {k: x for k, x in r.items() if k != field}})
    return out


def filter_agreement(items: list[dict], min_agreement: float, source: str) -> list[dict]:
    """Keep the examples whose annotators agreed at least `min_agreement`: max(p, 1 - p) >= it, p the
    share of votes for the chosen response ('p_chosen'). With a noisy panel most of the pairs it barely
    split on are pairs of equally good responses, so their labels are coin flips that a direct method
    fits as readily as real preferences; dropping them trades data for signal. 0 keeps everything."""
    if not min_agreement:
        return items
    if not 0.5 < min_agreement <= 1:
        raise TetherError(f"data.min_agreement must be in (0.5, 1] (the majority's vote share) or 0 for off, got {min_agreement}")
    missing = next((it["row"] for it in items if it.get("p_chosen") is None), None)
    if missing is not None:
        raise TetherError(f"{source}: data.min_agreement needs a p_chosen column (the annotators' vote share for "
                          f"chosen, as tether label writes it); row {missing} has none")
    kept = [it for it in items if max(it["p_chosen"], 1 - it["p_chosen"]) >= min_agreement - 1e-9]
    if not kept:
        raise TetherError(f"{source}: no example has annotator agreement >= {min_agreement}")
    log.info(f"data.min_agreement {min_agreement}: kept {len(kept)} of {len(items)} examples of {source}")
    return kept


# --------------------------------------------------------------------------------------------------
# Tokenisation with the assistant-only loss mask


def render(tok, messages: list[dict], add_generation_prompt: bool = False) -> str:
    if tok.chat_template:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # No chat template (a base model): plain turns, each assistant turn closed by EOS.
    text = "".join(m["content"] + (tok.eos_token if m["role"] == "assistant" else "\n") for m in messages)
    return text


def tokenize_sft(tok, example: dict, first_trained: int = 0) -> dict:
    """Token ids and a loss mask that is 1 exactly on assistant tokens (content and closing EOS).

    The chat template is rendered once; each assistant turn's character span is found by rendering
    the conversation up to that turn, and tokens are mapped to spans through the offset mapping, so
    the mask is exact whatever the template looks like (as long as it renders prefixes stably).
    Assistant turns before message `first_trained` are context, not targets (a preference example's
    prompt may hold earlier assistant turns; only its completion is scored).
    """
    if "text" in example:
        ids = tok(example["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return {"input_ids": ids, "loss_mask": [1] * len(ids)}
    msgs = example["messages"]
    full = render(tok, msgs)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or i < first_trained:
            continue
        before = render(tok, msgs[:i], add_generation_prompt=True) if i else ""
        upto = render(tok, msgs[: i + 1])
        if not full.startswith(before) or not full.startswith(upto):
            raise TetherError("the tokenizer's chat template does not render conversation prefixes stably; cannot locate assistant tokens")
        turn = upto[len(before):]
        end = turn.rfind(tok.eos_token) if tok.eos_token else -1
        stop = len(before) + (end + len(tok.eos_token) if end >= 0 else len(turn))
        spans.append((len(before), stop))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [int(any(a <= s < b for a, b in spans) and e > s) for s, e in offsets]
    return {"input_ids": ids, "loss_mask": mask}


def tokenize_scored(tok, messages: list[dict], max_length: int) -> list[int]:
    """Token ids of a conversation for a reward or value model, ending at its last EOS (the score is
    read there, never on a pad or a template's trailing newline). Over max_length, the *start* is cut:
    the end carries the score."""
    text = render(tok, messages)
    if tok.eos_token and tok.eos_token in text:
        text = text[: text.rfind(tok.eos_token) + len(tok.eos_token)]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids[-max_length:]


def group_preferences(pairs: list[dict], tok, max_length: int) -> list[dict]:
    """Group pairs by prompt for the InstructGPT trick: each group holds its distinct responses once
    (token ids) and its pairs as indices into them, so K responses cost K forwards, not 2 C(K, 2)."""
    groups: dict[str, dict] = {}
    for p in pairs:
        key = json.dumps(p["prompt"], sort_keys=True)
        g = groups.setdefault(key, {"responses": [], "index": {}, "pairs": [], "texts": []})
        idx = []
        for side in ("chosen", "rejected"):
            rkey = json.dumps(p[side], sort_keys=True)
            if rkey not in g["index"]:
                g["index"][rkey] = len(g["responses"])
                g["responses"].append(tokenize_scored(tok, p["prompt"] + p[side], max_length))
                g["texts"].append(p[side][-1]["content"])
            idx.append(g["index"][rkey])
        g["pairs"].append({"c": idx[0], "r": idx[1], "p": p["p_chosen"], "margin": p["margin"], "row": p["row"]})
    return [{"responses": g["responses"], "pairs": g["pairs"], "texts": g["texts"]} for g in groups.values()]


def collate_groups(groups: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Flatten groups into one right-padded batch of responses plus pair index tensors."""
    seqs, c, r, p, m = [], [], [], [], []
    for g in groups:
        base = len(seqs)
        seqs += g["responses"]
        for pr in g["pairs"]:
            c.append(base + pr["c"])
            r.append(base + pr["r"])
            p.append(1.0 if pr["p"] is None else pr["p"])
            m.append(0.0 if pr["margin"] is None else pr["margin"])
    n = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
    lengths = torch.tensor([len(s) for s in seqs])
    return {
        "input_ids": input_ids, "lengths": lengths,
        "attention_mask": (torch.arange(n)[None, :] < lengths[:, None]).long(),
        "chosen_idx": torch.tensor(c), "rejected_idx": torch.tensor(r),
        "p_chosen": torch.tensor(p), "margin": torch.tensor(m),
    }


def apply_length_policy(examples: list[dict], max_length: int, policy: str, source: str) -> list[dict]:
    """Rows over max_length: 'truncate' (keep the first max_length tokens), 'drop', or 'error'."""
    long = [i for i, e in enumerate(examples) if len(e["input_ids"]) > max_length]
    if not long:
        return examples
    if policy == "error":
        i = long[0]
        raise TetherError(
            f"{source}, row {examples[i]['row']}: {len(examples[i]['input_ids'])} tokens, over max_length={max_length} "
            f"({len(long)} rows in all); raise data.max_length or set data.overlong=truncate|drop"
        )
    log.warning("%s: %d of %d rows are longer than max_length=%d tokens; policy '%s'", source, len(long), len(examples), max_length, policy)
    if policy == "drop":
        keep = set(range(len(examples))) - set(long)
        return [e for i, e in enumerate(examples) if i in keep]
    out = []
    for e in examples:
        e = {**e, "input_ids": e["input_ids"][:max_length], "loss_mask": e["loss_mask"][:max_length]}
        if sum(e["loss_mask"][1:]) > 0:  # a row truncated before its first target token teaches nothing
            out.append(e)
    return out


def prepare_sft(tok, rows: Rows, max_length: int, overlong: str) -> list[dict]:
    examples = []
    for i, ex in enumerate(normalise_sft(rows)):
        t = tokenize_sft(tok, ex)
        if sum(t["loss_mask"][1:]) == 0:
            raise TetherError(f"{rows.where(i)}: no tokens to learn from after tokenisation")
        t["row"] = rows.numbers[i]
        examples.append(t)
    return apply_length_policy(examples, max_length, overlong, rows.source)


def split_eval(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded held-out split (at least one example when fraction > 0)."""
    if fraction <= 0:
        return examples, []
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, round(len(examples) * fraction))
    if n_eval >= len(examples):
        raise TetherError(f"eval_fraction={fraction} leaves no training rows out of {len(examples)}")
    ev = sorted(idx[:n_eval])
    tr = sorted(idx[n_eval:])
    return [examples[i] for i in tr], [examples[i] for i in ev]


def split_by_prompt(items: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out whole prompts, so no held-out example shares a prompt with a training example."""
    groups: dict[str, list[dict]] = {}
    for it in items:
        groups.setdefault(json.dumps(it["prompt"], sort_keys=True), []).append(it)
    train, held = split_eval(list(groups.values()), fraction, seed)
    return [x for g in train for x in g], [x for g in held for x in g]


def preference_splits(d, normalise, seed: int) -> tuple[list[dict], list[dict]]:
    """Training and held-out items of preference data (`d` a DataConfig, `normalise` the reader of its
    rows): `d.eval_path`, or whole prompts of `d.path` held out; only the training split is filtered by
    `d.min_agreement`, so held-out metrics stay comparable across thresholds."""
    items = normalise(read_rows(d.path))
    if d.eval_path:
        train, held = items, normalise(read_rows(d.eval_path))
    else:
        train, held = split_by_prompt(items, d.eval_fraction, seed)
    return filter_agreement(train, d.min_agreement, d.path), held


# --------------------------------------------------------------------------------------------------
# Packing and collation


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """First-fit-decreasing packing into rows of at most max_length tokens.

    Each packed row keeps `segment_ids` (which example a token came from) and `position_ids` that
    restart at 0 per example; the collator turns segments into a block-diagonal causal mask, so no
    token attends across examples. The first token of every segment has loss_mask 0: there is
    nothing before it within its own example to predict it from.
    """
    bins: list[list[dict]] = []
    sizes: list[int] = []
    for e in sorted(examples, key=lambda e: -len(e["input_ids"])):
        n = len(e["input_ids"])
        for b, size in enumerate(sizes):
            if size + n <= max_length:
                bins[b].append(e)
                sizes[b] += n
                break
        else:
            bins.append([e])
            sizes.append(n)
    packed = []
    for b in bins:
        row = {"input_ids": [], "loss_mask": [], "position_ids": [], "segment_ids": []}
        for s, e in enumerate(b):
            n = len(e["input_ids"])
            row["input_ids"] += e["input_ids"]
            row["loss_mask"] += [0] + e["loss_mask"][1:]
            row["position_ids"] += list(range(n))
            row["segment_ids"] += [s] * n
        packed.append(row)
    return packed


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch. Padding is excluded by lengths (attention) and loss_mask (loss).

    Unpacked rows get a 2-D attention mask; packed rows a 4-D boolean block-diagonal causal mask
    (True = may attend), built from segment ids.
    """
    n = max(len(e["input_ids"]) for e in batch)
    B = len(batch)
    input_ids = torch.full((B, n), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((B, n), dtype=torch.long)
    lengths = torch.tensor([len(e["input_ids"]) for e in batch])
    for i, e in enumerate(batch):
        L = len(e["input_ids"])
        input_ids[i, :L] = torch.tensor(e["input_ids"])
        loss_mask[i, :L] = torch.tensor(e["loss_mask"])
    out = {"input_ids": input_ids, "loss_mask": loss_mask}
    valid = torch.arange(n)[None, :] < lengths[:, None]
    if "segment_ids" not in batch[0]:
        out["attention_mask"] = valid.long()
        return out
    seg = torch.full((B, n), -1, dtype=torch.long)
    pos = torch.zeros((B, n), dtype=torch.long)
    for i, e in enumerate(batch):
        L = len(e["input_ids"])
        seg[i, :L] = torch.tensor(e["segment_ids"])
        pos[i, :L] = torch.tensor(e["position_ids"])
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    same = (seg[:, :, None] == seg[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    # padding rows attend to themselves only, so softmax never sees an all-masked row
    allowed = (same & causal) | torch.eye(n, dtype=torch.bool)
    out["attention_mask"] = allowed[:, None, :, :]
    out["position_ids"] = pos
    return out


def describe_example(tok, example: dict) -> str:
    """The tokens of one example with the trained span in [[...]], for --verbose start-up output."""
    parts, cur, on = [], [], False
    for t, m in zip(example["input_ids"], example["loss_mask"]):
        if bool(m) != on:
            parts.append(tok.decode(cur) if not on else f"[[{tok.decode(cur)}]]")
            cur, on = [], bool(m)
        cur.append(t)
    parts.append(tok.decode(cur) if not on else f"[[{tok.decode(cur)}]]")
    return "".join(parts)
