"""llama.cpp's own ``llama-server`` for one job: started on a free loopback port, health-checked,
stopped by its PID when the job ends, also when it fails or Slurm sends SIGTERM.

The server listens on 127.0.0.1 only (never on the node's network) and is started as the job's
own child in a new process group, so stopping it kills nothing else. ``LlamaServer`` is a context
manager; ``request`` is the one JSON-over-HTTP call the adapter (``lm_adapter``) makes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmpipe import paths
from llmpipe.errors import PipelineError

HOST = "127.0.0.1"
# Loading a 7B GGUF from a cold network file system takes minutes; the default model seconds.
STARTUP_TIMEOUT_S = 600
STOP_GRACE_S = 10


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on now on ``host`` (the kernel's choice; the server binds it
    right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Nobody listens on ``port``: SO_REUSEADDR, so that the TIME_WAIT of a closed server's
    last connections does not count (a server could bind it again right away)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def request(url: str, body: dict | None = None, timeout: float = 600) -> Any:
    """GET (no body) or POST JSON to the server; the decoded JSON answer. The URL is always our
    own loopback server (``LlamaServer.url``)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(  # noqa: S310 - http://127.0.0.1 only, built by LlamaServer
        url, data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:500]
        raise PipelineError(f"llama-server {url}: HTTP {err.code}: {detail}") from err


class LlamaServer:
    """``llama-server`` on ``gguf`` with ``slots`` parallel sequences of ``n_ctx`` tokens each.

    ``log`` receives the server's own output. ``pid`` and ``port`` are set while it runs.
    """

    def __init__(
        self,
        gguf: str | os.PathLike,
        *,
        slots: int,
        n_ctx: int,
        threads: int,
        n_gpu_layers: int,
        log: str | os.PathLike,
        flash_attn: bool = False,
        kv_type: str = "f16",
        seed: int = 0,
    ):
        self.gguf = Path(gguf)
        self.slots = slots
        self.n_ctx = n_ctx
        self.threads = threads
        self.n_gpu_layers = n_gpu_layers
        self.log = Path(log)
        self.flash_attn = flash_attn
        self.kv_type = kv_type
        self.seed = seed
        self.port: int | None = None
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def command(self) -> list[str]:
        return [
            str(paths.llama_tool("llama-server")),
            "--model", str(self.gguf),
            "--host", HOST,
            "--port", str(self.port),
            # the server splits its context over the slots: n_ctx tokens per request
            "--ctx-size", str(self.n_ctx * self.slots),
            "--parallel", str(self.slots),
            "--threads", str(self.threads),
            "--threads-batch", str(self.threads),
            "--n-gpu-layers", str(self.n_gpu_layers),
            "--flash-attn", "on" if self.flash_attn else "off",
            "--cache-type-k", self.kv_type,
            "--cache-type-v", self.kv_type,
            "--seed", str(self.seed),
            "--no-webui",
        ]  # fmt: skip

    def start(self) -> None:
        self.port = free_port()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            # own session: SIGINT from the terminal reaches the job, which stops the server
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        print(f"llama-server pid {self.pid} on {self.url} ({self.slots} slots)", flush=True)
        self.wait_healthy()

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Until /health answers 200 (the model is loaded); the server's exit is an error."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PipelineError(
                    f"llama-server exited with status {self.process.returncode} before it was "
                    f"ready (model {self.gguf}); its log: {self.log}"
                )
            with contextlib.suppress(OSError, PipelineError, ValueError):
                if request(f"{self.url}/health", timeout=5).get("status") == "ok":
                    return
            time.sleep(0.2)
        raise PipelineError(f"llama-server not healthy after {timeout:.0f} s; its log: {self.log}")

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after a grace period; idempotent."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        print(f"llama-server pid {self.pid} stopped", flush=True)

    def __enter__(self) -> LlamaServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM (Slurm's scancel / time limit, Snakemake's stop) into SystemExit so that the
    ``with LlamaServer`` blocks unwind and stop their servers; the old handler comes back."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
