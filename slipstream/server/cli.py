"""`slipstream serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, get_args

from slipstream.backends.vllm_backend import (
    VllmOptions,
    add_vllm_args,
    vllm_engine_config_from_args,
)
from slipstream.config import SchedulerConfig
from slipstream.engine.args import add_engine_args, engine_config_from_args
from slipstream.server.backend_registry import BACKENDS, BackendUnavailableError
from slipstream.server.config import LogFormat, LogLevel, ServerConfig

API_KEY_ENV = "SLIPSTREAM_API_KEY"


def add_parser(subparsers: Any) -> None:
    """Register the `serve` subcommand."""
    p = subparsers.add_parser(
        "serve",
        help="Serve a model over an OpenAI-compatible HTTP API.",
        description="Serve a model over an OpenAI-compatible HTTP API: /v1/chat/completions, "
        "/v1/completions, /v1/models, /tokenize, /detokenize, /health, /version, /metrics "
        "(Prometheus) and /docs.",
    )
    server = add_server_args(p)
    add_engine_args(p)
    add_vllm_args(p)
    server.add_argument(
        "--max-queued-requests",
        type=int,
        default=SchedulerConfig.max_queued_requests,
        help="Sequences allowed to wait for a batch slot beyond the --max-num-seqs running "
        "(a request with n choices counts n); beyond it the server answers 429 with "
        "Retry-After. 0: only what fits in the batch. Default: unbounded.",
    )
    p.set_defaults(func=serve)


def add_server_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """HTTP-layer flags (the group, for more); defaults come from ServerConfig."""
    g = p.add_argument_group("server")
    g.add_argument(
        "--host", default=ServerConfig.host, help="Address to listen on. (default: %(default)s)"
    )
    g.add_argument(
        "--port",
        type=int,
        default=ServerConfig.port,
        help="Port to listen on. (default: %(default)s)",
    )
    g.add_argument(
        "--served-model-name",
        default=ServerConfig.served_model_name,
        help="The model name clients send and see; default: the engine's model name.",
    )
    g.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or ServerConfig.api_key,
        help="Require 'Authorization: Bearer KEY' on every route except /health, /metrics, "
        f"/version and /docs. Also read from ${API_KEY_ENV}. Default: no authentication.",
    )
    g.add_argument(
        "--backend",
        default=ServerConfig.backend,
        choices=BACKENDS.names(),
        help="Engine backend: native (embedded, with the research decoders) or vllm. "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--log-format",
        default=ServerConfig.log_format,
        choices=get_args(LogFormat),
        help="text for people, json for log pipelines (one object per line). "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--log-level",
        default=ServerConfig.log_level,
        choices=get_args(LogLevel),
        help="Log level. (default: %(default)s)",
    )
    g.add_argument(
        "--log-requests",
        action=argparse.BooleanOptionalAction,
        default=ServerConfig.log_requests,
        help="One log line per request: id, status, tokens in/out, latency. (default: on)",
    )
    g.add_argument(
        "--shutdown-timeout",
        type=float,
        default=ServerConfig.shutdown_timeout_s,
        metavar="SECONDS",
        help="On SIGTERM, how long in-flight requests may run; what still runs then ends "
        "with a 503 (a stream: an error event and [DONE]). (default: %(default)s)",
    )
    return g


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Build and validate the ServerConfig; raises ValueError naming the bad value."""
    if args.backend not in BACKENDS:
        raise ValueError(f"unknown backend {args.backend!r}; valid: {', '.join(BACKENDS.names())}")
    if args.backend == "vllm":  # --decoder is checked against vLLM's methods instead
        engine = vllm_engine_config_from_args(args, max_queued=args.max_queued_requests)
    else:
        _no_vllm_flags(args)
        engine = engine_config_from_args(args, max_queued=args.max_queued_requests)
    return ServerConfig(
        engine=engine,
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        served_model_name=args.served_model_name,
        backend=args.backend,
        log_format=args.log_format,
        log_level=args.log_level,
        log_requests=args.log_requests,
        shutdown_timeout_s=args.shutdown_timeout,
    )


def _no_vllm_flags(args: argparse.Namespace) -> None:
    """ValueError naming a vLLM-only flag given to another backend, which would ignore it."""
    defaults = VllmOptions()
    unset: dict[str, object] = {
        "tensor_parallel_size": defaults.tensor_parallel_size,
        "pipeline_parallel_size": defaults.pipeline_parallel_size,
        "distributed_executor_backend": defaults.distributed_executor_backend,
        "gpu_memory_utilization": defaults.gpu_memory_utilization,
        "enforce_eager": defaults.enforce_eager,
        "vllm_arg": [],
    }
    for dest, default in unset.items():
        if getattr(args, dest, default) != default:
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"{flag} is for --backend vllm (this is --backend {args.backend})")


def serve(args: argparse.Namespace) -> int:
    """Build the backend and the app, then serve until SIGTERM."""
    try:
        config = config_from_args(args)
    except (ValueError, KeyError) as exc:
        return _fail(exc)
    from slipstream.server.app import create_app, run_server
    from slipstream.server.logs import configure_logging

    configure_logging(config.log_format, config.log_level)
    try:
        engine = BACKENDS[config.backend](config.engine, args)
    except (BackendUnavailableError, ValueError, FileNotFoundError) as exc:
        return _fail(exc)
    return run_server(create_app(engine, config), config)


def _fail(exc: BaseException) -> int:
    # KeyError's str() adds quotes; its message is the first argument.
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    print(f"slipstream serve: error: {message}", file=sys.stderr)
    return 2
