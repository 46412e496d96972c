"""`bench decoders`: start `slipstream serve` once per decoder, benchmark it, stop it."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from slipstream.loadtest.config import BenchConfig
from slipstream.loadtest.runner import BenchResult, ProgressFn, run_benchmark

logger = logging.getLogger(__name__)
_LOG_TAIL_LINES = 20


class ServerStartError(RuntimeError):
    """The server process exited or never became healthy; the message ends with its log."""


@dataclass(frozen=True)
class ServeSpec:
    """How to start one server per decoder."""

    decoders: tuple[str, ...]
    # decoder name -> its --decoder-config JSON
    decoder_configs: dict[str, str] = field(default_factory=dict)
    # Passed to `slipstream serve --model`; None = the server's default model.
    serve_model: str | None = None
    serve_args: tuple[str, ...] = ()
    # Replaces the whole command; formatted with {python}, {port}, {decoder}, {decoder_config}.
    serve_command: str | None = None
    startup_timeout_s: float = 300.0
    host: str = "127.0.0.1"


_TEMPLATE_FIELDS = ("python", "port", "decoder", "decoder_config")


def check_serve_command(template: str | None) -> None:
    """ValueError where a --serve-command template names a field it will not get, or is
    not a format string ("{" unclosed)."""
    if template is None:
        return
    try:
        template.format(**dict.fromkeys(_TEMPLATE_FIELDS, "x"))
    except KeyError as exc:
        fields = ", ".join("{" + f + "}" for f in _TEMPLATE_FIELDS)
        raise ValueError(
            f"--serve-command: unknown field {{{exc.args[0]}}}; valid: {fields}"
        ) from None
    except (ValueError, IndexError) as exc:
        raise ValueError(f"--serve-command: not a valid template ({exc})") from None


def build_serve_command(spec: ServeSpec, decoder: str, port: int) -> list[str]:
    """The argv that starts a server for `decoder` on `port`."""
    config_json = spec.decoder_configs.get(decoder, "")
    if spec.serve_command:
        text = spec.serve_command.format(
            python=shlex.quote(sys.executable),
            port=port,
            decoder=decoder,
            decoder_config=shlex.quote(config_json or "{}"),
        )
        return shlex.split(text)
    argv = [sys.executable, "-m", "slipstream.cli", "serve", "--host", spec.host]
    argv += ["--port", str(port), "--decoder", decoder]
    if config_json:
        argv += ["--decoder-config", config_json]
    if spec.serve_model:
        argv += ["--model", spec.serve_model]
    return argv + list(spec.serve_args)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running_server(
    argv: Sequence[str], health_url: str, log_path: Path, timeout_s: float
) -> Iterator[subprocess.Popen[bytes]]:
    """Start `argv`, wait until `health_url` answers 200, and always stop it on exit."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        # Its own session, so terminal Ctrl-C reaches only us and we stop it in order.
        proc = subprocess.Popen(
            list(argv), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            _wait_healthy(proc, health_url, log_path, timeout_s)
            yield proc
        finally:
            stop_process(proc)


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 15.0) -> None:
    """SIGTERM the process's group, then SIGKILL it if it has not exited within grace_s."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)  # the group is the one start_new_session created
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            logger.warning("server pid %d ignored %s", proc.pid, sig.name)


def run_decoders(
    base: BenchConfig,
    spec: ServeSpec,
    out_dir: str | Path,
    progress_for: Callable[[str], ProgressFn | None] | None = None,
) -> list[tuple[str, BenchResult]]:
    """Benchmark each decoder on a fresh server with the same workload; JSON per decoder."""
    out = Path(out_dir)
    results = []
    for decoder in spec.decoders:
        port = free_port(spec.host)
        base_url = f"http://{spec.host}:{port}"
        argv = build_serve_command(spec, decoder, port)
        logger.info("starting %s", shlex.join(argv))
        log_path = out / f"serve-{decoder}.log"
        with running_server(argv, f"{base_url}/health", log_path, spec.startup_timeout_s):
            config = dataclasses.replace(base, base_url=base_url, label=f"{base.label}-{decoder}")
            result = run_benchmark(config, progress_for(decoder) if progress_for else None)
        result.summary["decoder"] = decoder
        result.summary["decoder_config"] = spec.decoder_configs.get(decoder)
        result.save(out / f"{config.label}.json")
        results.append((decoder, result))
        if result.summary.get("interrupted"):
            break
    return results


def _wait_healthy(
    proc: subprocess.Popen[bytes], url: str, log_path: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(
                f"server exited with code {proc.returncode} before {url} was healthy"
                f"{_log_tail(log_path)}"
            )
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.25)
    raise ServerStartError(f"{url} not healthy after {timeout_s:g} s{_log_tail(log_path)}")


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text("utf-8", "replace").splitlines()[-_LOG_TAIL_LINES:]
    except OSError:
        return ""
    return ("\n--- " + str(path) + " (last lines) ---\n" + "\n".join(lines)) if lines else ""
