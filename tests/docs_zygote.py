"""A warmed `ftclip` for tests/test_docs.py. Importing torch, transformers, peft and datasets costs a few seconds of
CPU per process, more than most documented commands then spend working, and the pages show about twenty such
commands. So one server process imports them once, and every `ftclip ...` a page shows runs in a fork of it:
its own process, with the caller's working directory, environment and stdin/stdout/stderr (passed as file
descriptors), running `python -m ftclip`'s entry point, and its exit code handed back to the caller.

    python docs_zygote.py serve SOCKET      # prints "ready" once warmed
    python docs_zygote.py call SOCKET ARGS  # what the `ftclip` on the pages' PATH runs

What is read at import time (huggingface_hub's offline switch, for instance) comes from the server's environment,
which the test sets to the one its commands run in. FTCLIP_DOCS_FRESH_PROCESSES=1 makes the test run every
command in a fresh process instead."""

from __future__ import annotations

import json
import os
import socket
import struct
import sys

HARNESS_FAILED = 125  # the exit code when the server could not run the command at all


def call(address: str, args: list[str]) -> int:
    payload = json.dumps({"argv": args, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    with socket.socket(socket.AF_UNIX) as connection:
        connection.connect(address)
        socket.send_fds(connection, [struct.pack("!I", len(payload)) + payload], [0, 1, 2])
        reply = b""
        while chunk := connection.recv(64):
            reply += chunk
    if not reply:
        print(f"docs_zygote: the server at {address} ended without an exit code", file=sys.stderr)
        return HARNESS_FAILED
    code = int(reply)
    return 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N


def run_command(request: dict, fds: list[int]) -> None:
    """In the forked child: become the caller's process, run ftclip, exit with its code. Never returns."""
    import atexit
    import runpy
    import signal
    import traceback

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.argv = ["ftclip", *request["argv"]]
    code = 0
    try:
        runpy.run_module("ftclip", run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # what an uncaught exception does to a real process: a traceback and exit 1
        traceback.print_exc()
        code = 1
    # A real process runs its exit handlers and flushes; the server's loop below must not run in the child.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve(address: str) -> None:
    import threading

    import datasets  # noqa: F401  (the imports every heavy command pays, paid once)
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import ftclip.cli  # noqa: F401

    server = socket.socket(socket.AF_UNIX)
    server.bind(address)
    server.listen(16)
    print("ready", flush=True)

    def answer(pid: int, connection: socket.socket) -> None:
        _, status = os.waitpid(pid, 0)
        try:
            connection.sendall(str(os.waitstatus_to_exitcode(status)).encode())
        except OSError:
            pass  # the caller is gone (the test's timeout killed it): nobody to tell
        connection.close()

    while True:
        connection, _ = server.accept()
        data, fds, _, _ = socket.recv_fds(connection, 1 << 16, 3)
        (length,) = struct.unpack("!I", data[:4])
        body = data[4:]
        while len(body) < length:
            body += connection.recv(length - len(body))
        sys.stdout.flush()
        # Forked from the main thread, so the command can install signal handlers (train does).
        pid = os.fork()
        if pid == 0:
            server.close()
            run_command(json.loads(body), fds)
        for fd in fds:
            os.close(fd)
        threading.Thread(target=answer, args=(pid, connection), daemon=True).start()


if __name__ == "__main__":
    mode, address, *rest = sys.argv[1:]
    if mode == "serve":
        serve(address)
    else:
        sys.exit(call(address, rest))
