"""`python SCRIPT ...`, `python -c CODE` and `python -m MODULE` for the tests, started as forks of a Python that has
already imported PyTorch and the other heavy libraries.

Tests run the web server, the command lines and killed training runs in processes of their own: their own pid,
file descriptors, signals and exit status, which is what those tests check. What a fresh interpreter would add is
4-5 CPU seconds of importing PyTorch and torchvision each time (~20 starts per run on a 2-core machine); here each
pytest-xdist worker pays it once, in multiprocessing's fork server (`set_forkserver_preload`), and every process is
forked from it in ~0.1 s. The child sets up what a fresh `python` would have (argv, working folder, environment,
sys.path, `-W`/`-u`, stdout/stderr on the given files) and runs the script as `__main__` with runpy; the project's
own modules are imported afresh in it. Tests about the interpreter start itself keep using subprocess.
`forked.Popen` (with PIPE, STDOUT, TimeoutExpired) stands in for the subprocess module of a script that runs
Python commands, for benchmarks/gpu_check.py's dry run.
"""
from __future__ import annotations

import atexit
import io
import json
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

# Third-party modules only: the project's code under test is imported by each child, as in a fresh process.
PRELOAD = ["numpy", "torch", "torchvision", "PIL.Image", "pandas", "sklearn.metrics", "scipy.stats", "matplotlib",
           "flask", "waitress", "pydicom", "highdicom", "pynetdicom", "onnxruntime"]

_context = None
_base_path: list[str] = []
_started: list[Forked] = []


def _fresh_sys_path() -> list[str]:
    """sys.path of a fresh `python` here, without its first entry (the script's folder) and without PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import json, sys; print(json.dumps(sys.path[1:]))"
    return json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                     check=True).stdout)


def _child(argv: list[str], cwd: str, env: dict, stdout: str, stderr: str, base_path: list[str],
           new_session: bool) -> None:
    """In the forked process: become `argv` (argv[0] is the interpreter) and exit with its status."""
    code = 1
    try:
        if new_session:
            os.setsid()
        # multiprocessing handed this child its own start method (forkserver); a fresh python has the platform's, so
        # a DataLoader's workers here are forked as they would be there, not started anew by a second fork server.
        multiprocessing.set_start_method(None, force=True)
        for fd, path in ((1, stdout), (2, stderr)):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(target, fd)
            os.close(target)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        args, options = list(argv[1:]), []
        while args and args[0].startswith("-") and args[0] not in ("-c", "-m"):
            options.append(args.pop(0))
            if options[-1] == "-W":
                warnings.simplefilter(args.pop(0))  # "-W always" and the like
        unbuffered = "-u" in options or bool(env.get("PYTHONUNBUFFERED"))
        encoding = sys.__stdout__.encoding if sys.__stdout__ else "utf-8"
        sys.stdout = sys.__stdout__ = io.TextIOWrapper(
            io.FileIO(1, "w", closefd=False) if unbuffered else io.BufferedWriter(io.FileIO(1, "w", closefd=False)),
            encoding=encoding, write_through=unbuffered)
        sys.stderr = sys.__stderr__ = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding=encoding,
                                                       errors="backslashreplace", line_buffering=True,
                                                       write_through=unbuffered)
        python_path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if "OMP_NUM_THREADS" in env and "torch" in sys.modules:  # read once by the preloaded library
            sys.modules["torch"].set_num_threads(int(env["OMP_NUM_THREADS"]))
        if args[0] == "-c":
            sys.argv = ["-c", *args[2:]]
            sys.path[:] = ["", *python_path, *base_path]
            exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        elif args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            sys.path[:] = [cwd, *python_path, *base_path]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            script = os.path.abspath(args[0])
            sys.argv = [args[0], *args[1:]]
            sys.path[:] = [os.path.dirname(script), *python_path, *base_path]
            runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(code)


class Forked:
    """The subprocess.Popen calls the tests make, for a forked process: pid, returncode, poll, wait, signals."""

    def __init__(self, argv: list[str], process: multiprocessing.Process) -> None:
        self.args = argv
        self._process = process
        self.pid = process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self._process.terminate()

    def kill(self) -> None:
        self._process.kill()


def popen(argv: list[str], *, cwd: str | os.PathLike, stdout: str | os.PathLike,
          stderr: str | os.PathLike | None = None, env: dict | None = None, new_session: bool = False) -> Forked:
    """Start `argv` (`[sys.executable, ...]`) with stdout (and stderr, or the same file) appended to the given files;
    `new_session`: in a session and process group of its own (subprocess's start_new_session)."""
    global _context
    if _context is None:
        _base_path[:] = _fresh_sys_path()
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    for path in (stdout, stderr or stdout):
        Path(path).touch()  # there for the caller to read at once, as with subprocess and an open file
    process = _context.Process(target=_child, args=(list(map(str, argv)), str(cwd), dict(env or os.environ),
                                                    str(stdout), str(stderr or stdout), _base_path, new_session))
    process.start()
    _started.append(Forked(argv, process))
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


@atexit.register
def _stop_leftovers() -> None:
    """A test that failed before stopping its server must not keep the pytest worker from exiting."""
    for proc in _started:
        if proc.poll() is None:
            proc.kill()
