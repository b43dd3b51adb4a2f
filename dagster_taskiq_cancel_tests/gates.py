"""Hold a process at one moment of its start-up, while a file the test controls exists.

A test names the file in an environment variable; the held process writes its pid next to it
(``<gate>.entered``) and waits, so that the test acts exactly while the process is held there.
"""

import os
import time
from pathlib import Path

HOLD_LIMIT_SECONDS = 300  # a test that fails never leaves a process held for ever


def hold(env_var: str) -> None:
    gate = os.environ.get(env_var)
    if not gate:
        return
    Path(f"{gate}.entered").write_text(str(os.getpid()))
    deadline = time.monotonic() + HOLD_LIMIT_SECONDS
    while os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)  # the workload: a start-up that takes long, not a synchronisation
