"""What every workflow script shares: its output goes to the rule's log, and a PipelineError
becomes one clear line (in the log and on the terminal) and exit status 1 instead of a traceback.

A job configured for a GPU or granted one passes ``gpu`` (``llmpipe.hardware.Need``): the GPU is
checked before any work (``llmpipe.hardware.check``), so a wrong node fails in seconds.
``measured_job`` adds the job's predicted-vs-measured record (``llmpipe.resources.Usage``).
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Iterator

from llmpipe.errors import PipelineError
from llmpipe.resources import Usage


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


@contextlib.contextmanager
def measured_job(smk, gpu=None, config_json: str | None = None) -> Iterator[Usage]:
    """``logged`` and ``Usage`` of a Snakemake job: its log (and GPU check), and its record's
    prediction next to what it measured. The prediction is the one its resources came from:
    ``params.estimate``, [step, options], the rule's own estimate function in common.smk."""
    step, options = smk.params.estimate
    with (
        logged(smk.log[0], smk.rule, gpu=gpu),
        Usage.of_job(smk, config_json, step=step, **options) as usage,
    ):
        yield usage
