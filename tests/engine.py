"""The real serving engine (vLLM through scripts/engine.sh) started for the contract tests and bench/serving.py:
its venv created when missing, one server on a loopback port, stopped (with its worker processes) on exit."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "engine.sh"
ENGINE_DIR = ROOT / ".engine"  # git-ignored: the venv (3.5 GB) and the converted decoder outlive one run
INSTALL_TIMEOUT_S = 1800  # ~680 MB of wheels: 2.5 min here; slow mirrors take longer
READY_TIMEOUT_S = 600  # 42 s here with --enforce-eager on an idle machine; the CPU may be shared
# What pip prints when an index cannot be reached or lacks a package: the tests then skip, other failures fail.
NO_NETWORK = ("Could not find a version that satisfies", "No matching distribution found", "NewConnectionError",
              "Temporary failure in name resolution", "Network is unreachable", "ConnectTimeoutError",
              "Max retries exceeded")


class EngineUnavailable(RuntimeError):
    """vLLM could not be installed for lack of network: the engine cannot run on this machine now."""


def ensure_installed() -> None:
    """The engine's venv, created through scripts/engine.sh when it is not there yet."""
    result = subprocess.run([str(SCRIPT), "install"], cwd=ROOT, capture_output=True, text=True,
                            timeout=INSTALL_TIMEOUT_S, env={**os.environ, "RAG_ENGINE_DIR": str(ENGINE_DIR)})
    if result.returncode == 0:
        return
    tail = "\n".join(line for line in result.stderr.splitlines()[-15:] if "is ignored" not in line)
    if any(marker in result.stderr for marker in NO_NETWORK):
        raise EngineUnavailable("vLLM could not be installed from the package index (no network, or no "
                                f"torch==2.13.0+cpu there: see scripts/engine.sh): {tail[-400:]}")
    raise RuntimeError(f"scripts/engine.sh install failed ({result.returncode}):\n{tail}")


@contextmanager
def running_engine(port: int, log: Path, max_model_len: int, lora: Path | None = None,
                   threads: int | None = 1) -> Iterator[str]:
    """vLLM serving the packaged decoder (fp32, eager) as model "default" on 127.0.0.1:port, and `lora` as the
    model named like its folder, with `threads` CPU threads (None: the script's choice); yields the /v1 base URL
    once /v1/models answers."""
    ensure_installed()
    env = {**os.environ, "RAG_ENGINE_DIR": str(ENGINE_DIR), "RAG_ENGINE_PORT": str(port),
           "RAG_OPENAI_MODEL": "default", "RAG_ENGINE_MAX_MODEL_LEN": str(max_model_len),
           "RAG_ENGINE_KV_GB": "1",
           "RAG_ENGINE_DTYPE": "float32",  # on a GPU too: the contract is the in-process decoder's fp32 text
           # the converted decoder is kept beside the venv, not in the user's cache
           "RAG_CACHE_DIR": str(ENGINE_DIR / "cache"), "RAG_DECODER_CACHE": "true"}
    env.pop("RAG_DECODER_MODEL", None)
    if threads is not None:
        env["RAG_ENGINE_THREADS"] = str(threads)
    if lora is not None:
        env["RAG_ENGINE_LORA"] = str(lora)
    base = f"http://127.0.0.1:{port}/v1"
    with open(log, "wb") as out:
        # its own process group: vLLM's engine core runs in a child process, stopped together with the server
        server = subprocess.Popen([str(SCRIPT), "serve"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        _wait_ready(base, server, log)
        yield base
    finally:
        _stop(server)


def _wait_ready(base: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the engine exited ({server.returncode}) before it was ready:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(f"{base}/models", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the engine was not ready after {READY_TIMEOUT_S} s:\n"
                       f"{log.read_text(errors='replace')[-3000:]}")


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
