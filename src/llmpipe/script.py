"""What every workflow script shares: its output goes to the rule's log, and a PipelineError
becomes one clear line (in the log and on the terminal) and exit status 1 instead of a traceback.

A job configured for a GPU or granted one passes ``gpu`` (``llmpipe.hardware.Need``): the GPU is
checked before any work (``llmpipe.hardware.check``), so a wrong node fails in seconds.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Iterator

from llmpipe.errors import PipelineError


@contextlib.contextmanager
def logged(log_path: str, rule: str, gpu=None) -> Iterator[None]:
    terminal = sys.__stderr__
    with open(log_path, "w", buffering=1) as log:
        sys.stdout = sys.stderr = log
        try:
            if gpu is not None and gpu.any:
                from llmpipe import hardware

                print(f"{rule}: GPU check: {hardware.check(gpu)}", flush=True)
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
