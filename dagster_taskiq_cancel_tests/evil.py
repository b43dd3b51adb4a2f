"""An attacker's module: importing it proves that code named by a queue message ran.

A forged task names it as a storage class in its own instance ref; a worker that trusted the
message would import it in the step child, which writes ``evil-ran`` beside ``DAGSTER_HOME``.
"""

import os
from pathlib import Path

Path(os.environ["DAGSTER_HOME"]).parent.joinpath("evil-ran").write_text(str(os.getpid()))
