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


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL cluster on a free loopback port (Debian's `postgresql` package, as .ci/run installs it),
    run as the `postgres` user when the tests run as root; its SQLAlchemy URL. Stopped and deleted at the end."""
    import glob
    import os
    import shutil
    import subprocess

    pytest.importorskip("psycopg")
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = bins[-1] if bins else shutil.which("initdb")
    if not initdb:
        pytest.fail("PostgreSQL is needed for the annotation store's PostgreSQL tests: `apt-get install -y postgresql` as root")
    bindir = os.path.dirname(initdb)
    import tempfile
    from pathlib import Path

    root = Path(tempfile.mkdtemp(prefix="tether-pg-"))  # not under pytest's tmp: that is root's alone (0700)
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    as_user = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    run = lambda *cmd: subprocess.run(as_user + list(cmd), check=True, capture_output=True, text=True)  # noqa: E731
    run(f"{bindir}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    run(f"{bindir}/pg_ctl", "-D", str(data), "-w", "-l", str(root / "log"), "-o",
        f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(as_user + [f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def new_store(request, tmp_path):
    """An empty annotation store on request.param: 'sqlite' (a file in tmp_path) or 'postgresql' (a new database in
    the session's throwaway cluster)."""
    from tether.annotate.store import Store

    if request.param == "sqlite":
        return Store(str(tmp_path / "ann.db"))
    import sqlalchemy as sa

    base = request.getfixturevalue("postgres_url")
    name = f"t{abs(hash(str(tmp_path))) % 10**9}"
    engine = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with engine.connect() as c:
        c.exec_driver_sql(f"CREATE DATABASE {name}")
    engine.dispose()
    return Store(base.rsplit("/", 1)[0] + "/" + name)
