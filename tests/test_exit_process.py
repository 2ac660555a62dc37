"""dalle_ds.utils.exit.exit_process: the entry points' exit keeps what a normal exit writes (non-daemon threads
joined, atexit handlers run, buffered output flushed) and the exit code, and skips only the interpreter's teardown."""
import subprocess
import sys
import textwrap

import pytest

from launch_utils import ROOT, single_process_env

PROGRAM = textwrap.dedent("""
    import atexit, sys, threading, time
    from dalle_ds.utils.exit import exit_process
    atexit.register(lambda: print("atexit ran"))
    def late():
        time.sleep(0.3)
        open(sys.argv[1], "w").write("thread finished")
    threading.Thread(target=late).start()
    sys.stdout.write("buffered, no newline")  # a pipe: block-buffered until flushed
    class Finalized:
        def __del__(self):
            print("teardown ran")
    keep = Finalized()  # a module global: finalized only by the interpreter's teardown
    exit_process(eval(sys.argv[2]))
""")


@pytest.mark.parametrize("code, status", [("0", 0), ("None", 0), ("3", 3), ("True", 1), ("False", 0)])
def test_exit_process_keeps_what_a_normal_exit_writes(tmp_path, code, status):
    marker = tmp_path / "marker"
    proc = subprocess.run([sys.executable, "-c", PROGRAM, str(marker), code], cwd=ROOT, env=single_process_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == status, proc.stderr
    assert marker.read_text() == "thread finished"  # the non-daemon thread was joined, not killed
    assert proc.stdout.startswith("buffered, no newline")
    assert "atexit ran" in proc.stdout
    assert "teardown ran" not in proc.stdout  # the teardown that costs seconds under torch is what it skips


def test_exit_process_refuses_a_message():
    from dalle_ds.utils.exit import exit_process

    with pytest.raises(TypeError, match="code must be an int"):
        exit_process("failed")


def test_exit_process_stops_an_idle_thread_pool():
    """A ThreadPoolExecutor nobody shut down (the host EMA's fold worker, held by an object in a reference cycle):
    a normal exit tells its idle worker to stop before joining it; exit_process must too, or it joins forever."""
    program = textwrap.dedent("""
        import gc, sys
        from concurrent.futures import ThreadPoolExecutor
        from dalle_ds.utils.exit import exit_process
        gc.disable()
        class Owner:
            def __init__(self):
                self.pool = ThreadPoolExecutor(max_workers=1)
                self.me = self  # a cycle: not freed before the exit
        Owner().pool.submit(print, "work done").result()
        exit_process(3)
    """)
    proc = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=single_process_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 3 and "work done" in proc.stdout, proc.stderr
