"""`python SCRIPT ...`, `python -c CODE` and `python -m MODULE` for the tests, started as forks of a Python that has
already imported PyTorch and the other heavy libraries.

Tests run the web server, the command lines and killed training runs in processes of their own: their own pid,
file descriptors, signals and exit status, which is what those tests check. What a fresh interpreter would add is
4-5 CPU seconds of importing PyTorch and torchvision each time (~20 starts per run on a 2-core machine); here each
pytest-xdist worker pays it once, in a template process (this file run as a script: it imports `PRELOAD` and then
forks one child per command, as multiprocessing's fork server does), and every process is forked from it in ~0.1 s.
The child sets up what a fresh `python` would have (argv, working folder, environment, sys.path, `-W`/`-u`,
stdin on /dev/null, stdout/stderr on the given files), runs the script as `__main__` with runpy and then leaves the
template's code the way a finished script leaves the interpreter: by SystemExit (or the script's uncaught exception)
out of the template's main, so the interpreter's own shutdown runs the threads' joins, the atexit handlers and the
stream flushes, and sets the exit status. The project's own modules are imported afresh in each child. Tests about
the interpreter start itself keep using subprocess.
`forked.Popen` (with PIPE, STDOUT, TimeoutExpired) stands in for the subprocess module of a script that runs
Python commands, for benchmarks/gpu_check.py's dry run.
"""
from __future__ import annotations

import atexit
import gc
import importlib
import io
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

# Third-party modules only: the project's code under test is imported by each child, as in a fresh process.
PRELOAD = ["numpy", "torch", "torchvision", "PIL.Image", "pandas", "sklearn.metrics", "scipy.stats", "matplotlib",
           "flask", "waitress", "pydicom", "highdicom", "pynetdicom", "onnxruntime"]
REAP_INTERVAL = 0.02  # seconds between the template's checks for ended children while some run


# ---- in the template process ----------------------------------------------------------------------------------

def _reply(message: dict) -> None:
    os.write(1, (json.dumps(message) + "\n").encode())  # unbuffered: a child inherits no pending bytes


_template_pid = os.getpid()
_exit_status: list[int | str] = []  # in a child: how its command ended, an exit status or "SIGINT"


def _end_child() -> None:
    """A child's last atexit handler: registered in the template before any library registered one, it runs after
    all others (atexit runs them last in, first out), after the interpreter joined the command's threads. It flushes
    the streams and leaves with the command's status, skipping what remains of the shutdown: tearing down every
    module the template imported, which frees (so first copies) the template's heap, ~3 s a child here, and in which
    onnxruntime's destructor waits forever for the template's thread pool, a pool that a fork does not have."""
    if os.getpid() == _template_pid or not _exit_status:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    if _exit_status[0] == "SIGINT":  # as the interpreter ends on an uncaught KeyboardInterrupt: by the signal
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(_exit_status[0])


def _serve() -> None:
    """The template's loop: one JSON command a line on stdin -> fork it, answer {"started": pid}; answer
    {"pid": pid, "returncode": code} when it ends. End of stdin (the tests' process is gone) kills what still runs."""
    atexit.register(_end_child)
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional library: the commands that need it import it themselves
            pass
    gc.freeze()  # the template's objects: left out of the children's collections, so not copied by them
    base_path = sys.path[1:]  # a fresh `python`'s sys.path after its first entry (started without PYTHONPATH)
    running: set[int] = set()
    pending = b""
    while True:
        ready, _, _ = select.select([0], [], [], REAP_INTERVAL if running else None)
        if ready:
            data = os.read(0, 1 << 16)
            if not data:
                break
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                pid = os.fork()
                if pid == 0:
                    _become(json.loads(line), base_path)  # leaves _serve by SystemExit or the script's exception
                running.add(pid)
                _reply({"started": pid})
        for pid in list(running):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                running.discard(pid)
                _reply({"pid": pid, "returncode": os.waitstatus_to_exitcode(status)})
    for pid in running:
        os.kill(pid, signal.SIGKILL)


def _become(command: dict, base_path: list[str]) -> None:
    """In the forked child: become `command["argv"]` (argv[0] is the interpreter). Ends as the command's script
    ends, by SystemExit or its uncaught exception, which leave the template's code for the interpreter's exit."""
    try:
        _run(command, base_path)
    except SystemExit as exc:
        _exit_status.append(0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1)
        raise
    except KeyboardInterrupt:
        _exit_status.append("SIGINT")
        raise
    except BaseException:
        _exit_status.append(1)
        raise
    _exit_status.append(0)
    raise SystemExit(0)  # the script returned: end as a script that ran to its end does


def _run(command: dict, base_path: list[str]) -> None:
    """Set up what a fresh `python` would have, then run the command's script, code or module as __main__."""
    env = command["env"]
    if command["new_session"]:
        os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, path in ((1, command["stdout"]), (2, command["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.chdir(command["cwd"])
    os.environ.clear()
    os.environ.update(env)
    args, options = list(command["argv"][1:]), []
    while args and args[0].startswith("-") and args[0] not in ("-c", "-m"):
        options.append(args.pop(0))
        if options[-1] == "-W":
            warnings.simplefilter(args.pop(0))  # "-W always" and the like
    _fresh_streams(unbuffered="-u" in options or bool(env.get("PYTHONUNBUFFERED")))
    python_path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if "OMP_NUM_THREADS" in env and "torch" in sys.modules:  # read once by the preloaded library
        sys.modules["torch"].set_num_threads(int(env["OMP_NUM_THREADS"]))
    if args[0] == "-c":
        sys.argv = ["-c", *args[2:]]
        sys.path[:] = ["", *python_path, *base_path]
        exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    elif args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        sys.path[:] = [command["cwd"], *python_path, *base_path]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        script = os.path.abspath(args[0])
        sys.argv = [args[0], *args[1:]]
        sys.path[:] = [os.path.dirname(script), *python_path, *base_path]
        runpy.run_path(script, run_name="__main__")


def _fresh_streams(unbuffered: bool) -> None:
    """sys.stdin/stdout/stderr on fds 0-2 as a fresh interpreter opens them (`-u`: unbuffered)."""
    encoding = sys.__stdout__.encoding if sys.__stdout__ else "utf-8"
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)),
                                                 encoding=encoding)
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(
        io.FileIO(1, "w", closefd=False) if unbuffered else io.BufferedWriter(io.FileIO(1, "w", closefd=False)),
        encoding=encoding, write_through=unbuffered)
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding=encoding,
                                                   errors="backslashreplace", line_buffering=True,
                                                   write_through=unbuffered)


# ---- in the tests' process ------------------------------------------------------------------------------------

class _Template:
    """This file running as the template process, and what it reports: the pids it started and their exit codes."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self._process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         env=env)
        self._lock = threading.Lock()  # one command at a time: its "started" answer is the next one to come
        self._changed = threading.Condition()
        self._started: list[int] = []
        self.returncodes: dict[int, int] = {}
        threading.Thread(target=self._read_answers, name="forked-template", daemon=True).start()

    def _read_answers(self) -> None:
        for line in self._process.stdout:
            answer = json.loads(line)
            with self._changed:
                if "started" in answer:
                    self._started.append(answer["started"])
                else:
                    self.returncodes[answer["pid"]] = answer["returncode"]
                self._changed.notify_all()
        with self._changed:  # the template is gone: nothing will be reported any more
            self._started.append(-1)
            self._changed.notify_all()

    def start(self, command: dict) -> int:
        with self._lock:
            self._process.stdin.write((json.dumps(command) + "\n").encode())
            self._process.stdin.flush()
            with self._changed:
                self._changed.wait_for(lambda: self._started)
                pid = self._started.pop(0)
        if pid < 0:
            raise RuntimeError(f"the preloaded Python ({__file__}) ended; its errors are on stderr")
        return pid

    def wait(self, pid: int, timeout: float | None) -> int | None:
        with self._changed:
            self._changed.wait_for(lambda: pid in self.returncodes, timeout)
            return self.returncodes.get(pid)


_template: _Template | None = None
_started: list[Forked] = []


class Forked:
    """The subprocess.Popen calls the tests make, for a forked process: pid, returncode, poll, wait, signals."""

    def __init__(self, argv: list[str], pid: int, template: _Template) -> None:
        self.args, self.pid, self._template = argv, pid, template

    @property
    def returncode(self) -> int | None:
        return self._template.returncodes.get(self.pid)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        code = self._template.wait(self.pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return code

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def popen(argv: list[str], *, cwd: str | os.PathLike, stdout: str | os.PathLike,
          stderr: str | os.PathLike | None = None, env: dict | None = None, new_session: bool = False) -> Forked:
    """Start `argv` (`[sys.executable, ...]`) with stdout (and stderr, or the same file) appended to the given files;
    `new_session`: in a session and process group of its own (subprocess's start_new_session)."""
    global _template
    if _template is None:
        _template = _Template()
        atexit.register(_stop_leftovers)  # here, not at import: the template imports this file too
    for path in (stdout, stderr or stdout):
        Path(path).touch()  # there for the caller to read at once, as with subprocess and an open file
    command = {"argv": list(map(str, argv)), "cwd": str(cwd), "env": dict(env or os.environ),
               "stdout": str(stdout), "stderr": str(stderr or stdout), "new_session": new_session}
    _started.append(Forked(argv, _template.start(command), _template))
    return _started[-1]


def run(argv: list[str], *, cwd: str | os.PathLike, env: dict | None = None,
        timeout: float | None = None) -> subprocess.CompletedProcess:
    """subprocess.run(argv, capture_output=True, text=True, timeout=...) for a forked process."""
    with tempfile.TemporaryDirectory(prefix="forked-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        proc = popen(argv, cwd=cwd, env=env, stdout=out, stderr=err)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        return subprocess.CompletedProcess(argv, proc.returncode, out.read_text(errors="replace"),
                                           err.read_text(errors="replace"))


# What a script that runs Python commands with `subprocess` needs, so a test can hand it this module instead
# (benchmarks/gpu_check.py's dry run); a command of another program is started by subprocess itself.
PIPE, STDOUT, TimeoutExpired = subprocess.PIPE, subprocess.STDOUT, subprocess.TimeoutExpired


class Popen:
    """subprocess.Popen(argv, cwd=, env=, stdout=PIPE, stderr=PIPE or STDOUT, text=, start_new_session=) for a
    Python command: a forked process whose piped output is kept in temporary files until communicate()."""

    def __init__(self, argv: list[str], cwd: str | os.PathLike | None = None, env: dict | None = None,
                 stdout: int | None = None, stderr: int | None = None, text: bool = False,
                 start_new_session: bool = False) -> None:
        if argv[0] != sys.executable or stdout != PIPE or stderr not in (PIPE, STDOUT):
            raise ValueError(f"forked.Popen runs `{sys.executable} ...` with piped output, not {argv[:2]}")
        self._tmp = tempfile.TemporaryDirectory(prefix="forked-")
        self._out = Path(self._tmp.name) / "stdout"
        self._err = Path(self._tmp.name) / "stderr" if stderr == PIPE else None
        self._text = text
        self._proc = popen(argv, cwd=cwd or os.getcwd(), env=env, stdout=self._out, stderr=self._err,
                           new_session=start_new_session)
        self.args, self.pid = self._proc.args, self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def poll(self) -> int | None:
        return self._proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self._proc.wait(timeout)

    def communicate(self, timeout: float | None = None) -> tuple:
        self._proc.wait(timeout)
        read = (lambda p: p.read_text(errors="replace")) if self._text else (lambda p: p.read_bytes())
        return read(self._out), (read(self._err) if self._err else None)


def _stop_leftovers() -> None:
    """A test that failed before stopping its server must not keep the pytest worker from exiting."""
    for proc in _started:
        if proc.poll() is None:
            proc.kill()


if __name__ == "__main__":
    _serve()
