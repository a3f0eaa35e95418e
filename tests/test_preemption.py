"""The signal handlers of kan_vit.training.preemption in a real process, with real signals: a
first SIGTERM (and its copies within the repeat window) is only noted, a later one stops the
process at once."""

import signal
import subprocess
import sys

SCRIPT = """
import os, signal, time
from kan_vit.training import preemption
preemption.install()
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGTERM)  # a copy (a launcher's forward): the same request
time.sleep(0.1)
print(preemption.requested(), flush=True)
time.sleep(preemption.REPEAT_WINDOW_S + 0.2)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(5)
print("still running", flush=True)
"""


def test_first_signal_is_noted_and_a_later_one_stops_at_once():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == [str(int(signal.SIGTERM))], result.stderr
    assert result.returncode == -signal.SIGINT  # ended by the signal's default action, nothing after it ran
