"""tests/support/forked.py starts the tests' command lines as forks of a preloaded Python: each must behave as the same
command does in a fresh interpreter (subprocess): exit status, stdout and stderr, argv, working folder, environment,
sys.path, `-W`, an uncaught exception, a signal."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from support import forked

PROBE = """
import json, os, sys, warnings
warnings.warn("a probe warning")
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "probe": os.environ.get("CXR_PROBE"),
                  "name": __name__}))
print("to stderr", file=sys.stderr)
if sys.argv[1] == "raise":
    raise ValueError("probe failure")
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize("options", [[], ["-W", "ignore"]], ids=["warnings", "-W ignore"])
@pytest.mark.parametrize("status", ["0", "3", "raise"])
def test_a_script_behaves_as_in_a_fresh_interpreter(tmp_path, options, status):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    argv = [sys.executable, *options, str(script), status, "two words"]
    env = {**os.environ, "CXR_PROBE": "from the caller"}
    fresh = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    fork = forked.run(argv, cwd=tmp_path, env=env, timeout=60)
    assert fork.returncode == fresh.returncode == {"0": 0, "3": 3, "raise": 1}[status]
    assert fork.stdout == fresh.stdout and '"probe": "from the caller"' in fork.stdout
    if status == "raise":  # the traceback's last line; the fork's has frames of forked.py above the script's
        assert fork.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1] == "ValueError: probe failure"
    else:
        assert fork.stderr == fresh.stderr
    assert ("a probe warning" in fork.stderr) == (not options)


def test_code_and_module_forms_and_a_kill(tmp_path):
    code = "import multiprocessing, sys; print(sys.argv, sys.path[0] == '', multiprocessing.get_start_method())"
    for argv in ([sys.executable, "-c", code, "x"], [sys.executable, "-m", "json.tool", "--help"]):
        fresh = subprocess.run(argv, cwd=os.getcwd(), capture_output=True, text=True, timeout=60)
        fork = forked.run(argv, cwd=os.getcwd(), timeout=60)
        assert (fork.returncode, fork.stdout, fork.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)

    out = tmp_path / "out.txt"
    proc = forked.popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"],
                        cwd=tmp_path, stdout=out)
    deadline = time.monotonic() + 30
    while "ready" not in out.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
        time.sleep(0.05)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.2)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL == proc.returncode


def test_popen_stands_in_for_subprocess_with_pipes_and_a_session_of_its_own(tmp_path):
    """What benchmarks/gpu_check.py uses of subprocess: Popen with piped output, communicate, start_new_session."""
    code = "import os, sys; print('out', os.getsid(0) == os.getpid()); print('err', file=sys.stderr); sys.exit(4)"
    for stderr in (subprocess.PIPE, subprocess.STDOUT):
        answers = []
        for module in (subprocess, forked):
            proc = module.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=module.PIPE, stderr=stderr,
                                text=True, start_new_session=True)
            answers.append((*proc.communicate(timeout=60), proc.returncode))
        assert answers[0] == answers[1]
        assert answers[1][0].startswith("out True") and answers[1][2] == 4



@pytest.mark.parametrize("ending", ["return", "sys.exit('a message')", "raise KeyboardInterrupt"])
def test_the_end_runs_the_scripts_exit_handlers_and_joins_its_threads_as_a_fresh_interpreter_does(tmp_path, ending):
    """The fork leaves by the interpreter's own shutdown: a thread still running is waited for, then the atexit
    handlers run (the last registered first), with buffered output flushed; the status is the fresh one's."""
    code = ("import atexit, sys, threading, time\n"
            "atexit.register(print, 'first registered')\n"
            "atexit.register(lambda: print('last registered', file=sys.stderr))\n"
            "threading.Thread(target=lambda: (time.sleep(0.3), print('thread done'))).start()\n"
            "print('buffered', end='')\n"
            f"{'pass' if ending == 'return' else ending}\n")
    argv = [sys.executable, "-c", code]
    fresh = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    fork = forked.run(argv, cwd=tmp_path, timeout=60)
    assert fork.returncode == fresh.returncode == {"return": 0, "sys.exit('a message')": 1,
                                                   "raise KeyboardInterrupt": -signal.SIGINT}[ending]
    assert fork.stdout == fresh.stdout == "bufferedthread done\nfirst registered\n"
    assert fork.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1] == "last registered"
