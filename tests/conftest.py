import json

import pytest

from tether.config import SFTConfig, load_config


@pytest.fixture(scope="session")
def tok():
    from tether.models import load_tokenizer

    return load_tokenizer("builtin:tiny")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat(user, assistant):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


@pytest.fixture
def chat_file(tmp_path):
    words = ["apple", "river", "stone", "cloud", "maple", "tiger", "piano", "lemon", "ocean", "amber"]
    rows = [chat(f"Name item {i}.", f"Item {i} is the {words[i % 10]}{' and more' * (i % 4)}.") for i in range(40)]
    return write_jsonl(tmp_path / "chat.jsonl", rows)


def tiny_cfg(tmp_path, data, name="run", sets=(), **flags):
    """A tiny-model SFT config; `flags` use dotted keys, e.g. **{'train.max_steps': 4}."""
    base = {
        "model.name": "builtin:tiny", "data.path": str(data), "train.out": str(tmp_path / name),
        "train.max_steps": 6, "train.batch_size": 4, "train.lr": 1e-3, "train.report_to": "none",
        "train.save_every": 0, "data.eval_fraction": 0.1, "model.dtype": "fp32",
    }
    base.update(flags)
    return load_config(SFTConfig, None, base, list(sets))


def free_port() -> int:
    """A free loopback TCP port."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_uvicorn(app, port: int):
    """(server, thread): `app` under uvicorn on 127.0.0.1:port in a daemon thread, started."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(400):
        if server.started:
            break
        time.sleep(0.025)
    assert server.started, "uvicorn did not start"
    return server, thread
