"""The `tether` command for the data-parallel tests (tests/test_distributed.py), launched by torchrun, with
two test-only hooks set by environment variables:

  TETHER_TEST_WATCH=DIR, TETHER_TEST_WRITES=LOG  every rank but 0 records to LOG.rank<r> each write under
      DIR it attempts (opening a file for writing, mkdir, rename/replace, remove, rmtree, torch.save,
      safetensors' save_file): the test asserts there are none (only rank 0 writes the run folder)
  TETHER_TEST_SIGTERM=RANK:N                      that rank sends itself SIGTERM just before the N-th
      stop check (Run.should_stop, once per optimizer step or PPO iteration): the real signal path
"""

import os
import signal
import sys

rank = int(os.environ.get("RANK", "0"))
watch = os.environ.get("TETHER_TEST_WATCH")
if watch and rank != 0:
    root = os.path.realpath(watch)
    log_fd = os.open(f"{os.environ['TETHER_TEST_WRITES']}.rank{rank}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def record(what, path):
        try:
            p = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return
        if p == root or p.startswith(root + os.sep):
            os.write(log_fd, f"{what} {p}\n".encode())

    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1], args[2] or 0
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or flags & writing:
                record("open", args[0])
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
            record(event, args[0])
        elif event == "os.rename":  # os.rename and os.replace
            record(event, args[1])

    sys.addaudithook(hook)
    import safetensors.torch
    import torch

    def audited(fn, what):
        def wrapper(obj, f, *a, **k):
            if isinstance(f, (str, os.PathLike)):
                record(what, f)
            return fn(obj, f, *a, **k)
        return wrapper

    torch.save = audited(torch.save, "torch.save")
    safetensors.torch.save_file = audited(safetensors.torch.save_file, "save_file")

stop = os.environ.get("TETHER_TEST_SIGTERM")
if stop:
    stop_rank, at = (int(x) for x in stop.split(":"))
    if rank == stop_rank:
        from tether import runloop

        real = runloop.Run.should_stop
        calls = {"n": 0}

        def should_stop(self):
            calls["n"] += 1
            if calls["n"] == at:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(self)

        runloop.Run.should_stop = should_stop

from tether.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
