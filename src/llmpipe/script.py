"""What every workflow script shares: its output goes to the rule's log, and a PipelineError
becomes one clear line (in the log and on the terminal) and exit status 1 instead of a traceback.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Iterator

from llmpipe.errors import PipelineError


@contextlib.contextmanager
def logged(log_path: str, rule: str) -> Iterator[None]:
    terminal = sys.__stderr__
    with open(log_path, "w", buffering=1) as log:
        sys.stdout = sys.stderr = log
        try:
            yield
        except PipelineError as err:
            message = f"{rule}: error: {err}"
            print(message, file=log)
            print(message, file=terminal, flush=True)
            sys.exit(1)
        except BaseException:
            traceback.print_exc(file=log)
            raise
        finally:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
