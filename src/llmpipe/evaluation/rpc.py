"""One model across several hosts: llama.cpp's RPC backend (the guide's "CPU across multiple
hosts" recipe, which llama.cpp once did with MPI and now does with ``rpc-server``).

Every host runs ``rpc-server`` (built from the pinned sdist with ``-DGGML_RPC=ON``), which
offers its CPU (or GPUs) as a remote ggml device. The evaluating process registers each server
as a device before it loads the model; llama.cpp then splits the offloaded layers over the
devices as it splits them over local GPUs (``split_mode`` layer, ``tensor_split``), and every
``llama_decode`` runs the layers where they live, shipping only activations between hosts.

llama-cpp-python 0.3.36 has no ``rpc_servers`` argument; the registration below makes the calls
llama.cpp's own tools make for ``--rpc`` (``common/arg.cpp`` ``add_rpc_devices``) through
ctypes on the binding's own ``libggml``. A registration is for the whole process: a later
``Llama`` with ``n_gpu_layers`` > 0 offloads to the servers too.

``local_servers`` starts servers on this host (several "hosts" on 127.0.0.1: the tests, or one
node's GPUs each behind its own server); ``slurm_servers`` starts one per node of the Slurm
allocation with ``srun``. Both stop their servers by PID when the block ends, also on an error.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from llmpipe import atomic
from llmpipe.errors import ConfigError, PipelineError
from llmpipe.evaluation.server import free_port
from llmpipe.paths import llama_tool

# host:port, with a host of safe characters only (a hostname or an IPv4 address).
_ENDPOINT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}:[0-9]{1,5}$")
_REGISTERED: list[str] = []  # this process's RPC devices, in registration order


def check_endpoint(endpoint: str) -> str:
    if not _ENDPOINT.match(endpoint) or not 0 < int(endpoint.rsplit(":", 1)[1]) < 65536:
        raise ConfigError(f"RPC server {endpoint!r}: expected host:port (e.g. node12:50052)")
    return endpoint


def ggml() -> ctypes.CDLL:
    """The binding's own libggml (the one its libllama is linked against)."""
    import llama_cpp

    lib = Path(llama_cpp.llama_cpp._lib._name).with_name("libggml.so")
    g = ctypes.CDLL(str(lib))
    g.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    g.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    g.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    g.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    g.ggml_backend_register.argtypes = [ctypes.c_void_p]
    g.ggml_backend_dev_count.restype = ctypes.c_size_t
    g.ggml_backend_dev_get.restype = ctypes.c_void_p
    g.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    g.ggml_backend_dev_name.restype = ctypes.c_char_p
    g.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    g.ggml_backend_dev_description.restype = ctypes.c_char_p
    g.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
    g.ggml_backend_reg_count.restype = ctypes.c_size_t
    g.ggml_backend_reg_get.restype = ctypes.c_void_p
    g.ggml_backend_reg_get.argtypes = [ctypes.c_size_t]
    g.ggml_backend_reg_name.restype = ctypes.c_char_p
    g.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
    return g


def backend_registries() -> list[str]:
    """The backends this llama.cpp build has (CPU, RPC, CUDA …), whether or not this machine
    has a device for them (a login node has the CUDA backend and no GPU)."""
    g = ggml()
    return [g.ggml_backend_reg_name(g.ggml_backend_reg_get(i)).decode()
            for i in range(g.ggml_backend_reg_count())]  # fmt: skip


def register(endpoints: Sequence[str]) -> list[str]:
    """Register each server as a ggml device of this process (once per endpoint); returns every
    RPC endpoint registered so far."""
    import llama_cpp

    if not llama_cpp.llama_supports_rpc():
        raise PipelineError(
            "this llama-cpp-python build has no RPC backend: rebuild with tools/setup.sh "
            "(LLMPIPE_RPC=1, the default)"
        )
    g = ggml()
    reg = g.ggml_backend_reg_by_name(b"RPC")
    address = g.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server") if reg else 0
    if not address:
        raise PipelineError("libggml has no RPC registry (ggml_backend_rpc_add_server)")
    add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(address)
    for endpoint in endpoints:
        check_endpoint(endpoint)
        if endpoint in _REGISTERED:
            continue
        device_reg = add_server(endpoint.encode())
        if not device_reg:
            raise PipelineError(f"RPC server {endpoint}: could not connect")
        g.ggml_backend_register(device_reg)
        _REGISTERED.append(endpoint)
    return list(_REGISTERED)


def devices() -> list[tuple[str, str]]:
    """(name, description) of every ggml device this process can use (CPU, GPUs, RPC)."""
    g = ggml()
    out = []
    for i in range(g.ggml_backend_dev_count()):
        dev = g.ggml_backend_dev_get(i)
        out.append(
            (g.ggml_backend_dev_name(dev).decode(), g.ggml_backend_dev_description(dev).decode())
        )
    return out


@dataclass
class Server:
    """One running ``rpc-server`` (or the ``srun`` that runs it on a node)."""

    endpoint: str
    process: subprocess.Popen
    node: str = "localhost"

    @property
    def pid(self) -> int:
        return self.process.pid


def wait_listening(servers: Sequence[Server], timeout: float = 60.0) -> None:
    """Until every server accepts a connection; a server that exits first is an error."""
    deadline = time.monotonic() + timeout
    pending = list(servers)
    while pending:
        server = pending[0]
        if server.process.poll() is not None:
            raise PipelineError(
                f"rpc-server for {server.endpoint} on {server.node} exited with "
                f"{server.process.returncode} before it listened"
            )
        host, port = server.endpoint.rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                pending.pop(0)
                continue
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise PipelineError(f"rpc-server {server.endpoint} not listening after {timeout:.0f} s")
        time.sleep(0.2)


def stop(servers: Sequence[Server], grace: float = 10.0) -> None:
    """SIGTERM each server by PID, then SIGKILL what is left after ``grace`` seconds."""
    for server in servers:
        if server.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                server.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for server in servers:
        try:
            server.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def _server_command(port: int, threads: int, host: str) -> list[str]:
    return [str(llama_tool("rpc-server")), "-H", host, "-p", str(port), "-t", str(threads)]


@contextlib.contextmanager
def local_servers(
    count: int, threads: int = 1, log_dir: str | os.PathLike | None = None
) -> Iterator[list[Server]]:
    """``count`` rpc-servers on 127.0.0.1, each on a free port; listening when the block
    starts, stopped when it ends."""
    servers: list[Server] = []
    try:
        for i in range(count):
            port = free_port()
            command = _server_command(port, threads, "127.0.0.1")
            servers.append(Server(f"127.0.0.1:{port}", _start(command, log_dir, f"{i}")))
        wait_listening(servers)
        yield servers
    finally:
        stop(servers)


def slurm_nodes() -> list[tuple[str, str]]:
    """(node name, address) of every node of this Slurm allocation, in allocation order."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise PipelineError("not inside a Slurm allocation (no SLURM_JOB_NODELIST)")
    names = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
    ).stdout.split()
    out = []
    for name in names:
        info = subprocess.run(
            ["scontrol", "show", "node", name], capture_output=True, text=True, check=True
        ).stdout
        match = re.search(r"\bNodeAddr=(\S+)", info)
        out.append((name, match.group(1) if match else name))
    return out


def serve(host: str, threads: int, port_file: str | os.PathLike, tries: int = 8) -> int:
    """On a node (the task ``slurm_servers`` starts there): ``rpc-server`` on a port that is
    free on this node, written to ``port_file`` once the server is up; another try on another
    port when something takes the port first. Returns the server's exit status; SIGTERM (what
    stopping the srun sends) is passed on to the server."""
    for _ in range(tries):
        proc = subprocess.Popen(_server_command(free_port(host), threads, host))
        port = int(proc.args[proc.args.index("-p") + 1])
        try:
            proc.wait(timeout=1.0)  # it exits at once when it cannot bind
            continue
        except subprocess.TimeoutExpired:
            pass
        signal.signal(signal.SIGTERM, lambda *_, server=proc: server.terminate())
        atomic.write_text(port_file, f"{port}\n")
        return proc.wait()
    raise PipelineError(f"rpc-server on {host}: no free port after {tries} tries")


def _wait_port(port_file: Path, proc: subprocess.Popen, node: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if proc.poll() is not None:
            raise PipelineError(
                f"rpc-server on {node} exited with {proc.returncode} before it listened"
            )
        if time.monotonic() > deadline:
            raise PipelineError(f"rpc-server on {node}: no port after {timeout:.0f} s")
        time.sleep(0.2)
    return int(port_file.read_text())


@contextlib.contextmanager
def slurm_servers(
    threads: int = 1, log_dir: str | os.PathLike | None = None
) -> Iterator[list[Server]]:
    """One rpc-server per node of this Slurm allocation (``srun`` one task on each node, the
    job's step on it), listening on the node's address on a port free there (the node tells
    it back through a file in ``log_dir``, or the working folder: a folder every node sees);
    stopped by PID when the block ends."""
    servers: list[Server] = []
    shared = Path(log_dir or ".")
    shared.mkdir(parents=True, exist_ok=True)
    job = os.environ.get("SLURM_JOB_ID", "local")
    try:
        port_files = []
        for name, address in slurm_nodes():
            port_file = shared / f".rpc-port-{job}-{name}"
            port_file.unlink(missing_ok=True)
            # Bound to the node's own address (the cluster network), never 0.0.0.0: the RPC
            # protocol has no authentication.
            command = [
                "srun", "--nodes=1", "--ntasks=1", f"--nodelist={name}", "--overlap",
                f"--cpus-per-task={threads}", "--kill-on-bad-exit=1",
                sys.executable, "-m", "llmpipe.evaluation.rpc", "serve", address,
                str(threads), str(port_file),
            ]  # fmt: skip
            servers.append(Server(address, _start(command, log_dir, name), node=name))
            port_files.append(port_file)
        for server, port_file in zip(servers, port_files, strict=True):
            port = _wait_port(port_file, server.process, server.node, timeout=120.0)
            port_file.unlink(missing_ok=True)
            server.endpoint = f"{server.endpoint}:{port}"
        wait_listening(servers, timeout=120.0)
        yield servers
    finally:
        stop(servers)


def _start(command: list[str], log_dir, name: str) -> subprocess.Popen:
    """Start one server in its own session, its output in ``log_dir/rpc-server-<name>.log``."""
    if log_dir is None:
        return subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(log_dir) / f"rpc-server-{name}.log", "ab") as log:
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


# ---- One host against several: the check a user runs before trusting a placement ------------
def last_logits(llm, tokens: list[int]):
    """The logits of the last of ``tokens`` after one prompt pass from an empty cache."""
    import llama_cpp
    import numpy as np

    from llmpipe.evaluation import llama_backend as lb

    batch = lb._Batch(max(len(tokens), 1))
    try:
        lb._clear(llm)
        batch.fill(tokens, 0, None)
        lb._decode(llm, batch)
        row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(llm.n_vocab(),)).copy()
    finally:
        batch.close()
        lb._clear(llm)


def run_placement(
    gguf: str,
    prompts: list[str],
    *,
    n_gpu_layers: int,
    threads: int,
    max_new_tokens: int,
    n_ctx: int = 1024,
    verbose: bool = False,
) -> dict:
    """Greedy texts and last-prompt-position logits of ``prompts`` on the devices registered
    so far (``n_gpu_layers`` 0: this host's CPU only)."""
    from llmpipe import config as cfg
    from llmpipe.evaluation import llama_backend as lb
    from llmpipe.evaluation.records import Sampling

    section = {"n_gpu_layers": n_gpu_layers, "n_ctx": n_ctx, "tune_threads": False}
    settings = lb.LlamaSettings.from_config(
        {**cfg.defaults("evaluate.llama_cpp"), **section}, threads
    )
    start = time.perf_counter()
    llm = lb.load(gguf, settings, verbose=verbose)
    load_s = time.perf_counter() - start
    try:
        logits = [last_logits(llm, lb.tokenize(llm, p)) for p in prompts]
        results = lb.generate(
            llm, list(enumerate(prompts)), Sampling(max_new_tokens=max_new_tokens)
        )
    finally:
        llm.close()
    return {"load_s": load_s, "logits": logits, "results": results}


def compare_hosts(
    gguf: str,
    prompts: list[str],
    *,
    servers: list[str],
    threads: int = 1,
    max_new_tokens: int = 32,
    verbose: bool = False,
) -> dict:
    """The same GGUF on this host alone and split over ``servers``: same greedy tokens? how far
    apart are the logits? (``verbose``: llama.cpp's load log of the split run on stderr, which
    names the device of every layer)"""
    import numpy as np

    local = run_placement(
        gguf, prompts, n_gpu_layers=0, threads=threads, max_new_tokens=max_new_tokens
    )
    register(servers)
    remote = run_placement(
        gguf,
        prompts,
        n_gpu_layers=-1,
        threads=threads,
        max_new_tokens=max_new_tokens,
        verbose=verbose,
    )
    diffs = [
        float(np.max(np.abs(a - b))) for a, b in zip(local["logits"], remote["logits"], strict=True)
    ]
    scale = max(float(np.max(np.abs(a))) for a in local["logits"])
    same = [
        a.token_ids == b.token_ids for a, b in zip(local["results"], remote["results"], strict=True)
    ]
    return {
        "gguf": str(gguf),
        "servers": list(servers),
        "devices": [f"{n} ({d})" for n, d in devices()],
        "prompts": len(prompts),
        "same_tokens": same,
        "max_abs_logit_diff": max(diffs),
        "max_abs_logit": scale,
        "load_s": {"local": round(local["load_s"], 3), "rpc": round(remote["load_s"], 3)},
        "texts": {
            "local": [r.text for r in local["results"]],
            "rpc": [r.text for r in remote["results"]],
        },
    }


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # the node side of slurm_servers: serve HOST THREADS PORT_FILE
        host, threads, port_file = argv[1:4]
        return serve(check_endpoint(f"{host}:1").rsplit(":", 1)[0], int(threads), port_file)

    from llmpipe import config as cfg

    parser = argparse.ArgumentParser(
        prog="python -m llmpipe.evaluation.rpc",
        description="Run a GGUF on this host and split over RPC servers; print the comparison "
        "as JSON (same greedy tokens, largest logit difference).",
    )
    parser.add_argument("gguf")
    parser.add_argument("prompts", help="a prompts file, one per line")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", type=int, metavar="N", help="start N servers on 127.0.0.1")
    where.add_argument("--slurm", action="store_true", help="one server per allocated node")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--log-dir")
    parser.add_argument("--verbose", action="store_true", help="llama.cpp's load log (stderr)")
    args = parser.parse_args(argv)
    prompts = cfg.read_prompts(args.prompts)
    servers = (
        local_servers(args.local, args.threads, args.log_dir)
        if args.local
        else slurm_servers(args.threads, args.log_dir)
    )
    with servers as running:
        out = compare_hosts(
            args.gguf,
            prompts,
            servers=[s.endpoint for s in running],
            threads=args.threads,
            max_new_tokens=args.max_new_tokens,
            verbose=args.verbose,
        )
        out["server_pids"] = [s.pid for s in running]
        out["nodes"] = [s.node for s in running]
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
