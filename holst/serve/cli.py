"""``holst serve`` command line: flags and ``--config`` into a ServeConfig, then uvicorn (see :mod:`holst.serve.app`).

Kept apart from the app so that a missing ``serve`` extra is one clear line, not an ImportError.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os

from holst.cli_common import add_dataclass_arguments, add_runtime_arguments, given_values, load_pipeline
from holst.config import ServeConfig
from holst.errors import ConfigError, InputError
from holst.utils.runtime import get_logger, set_threads

logger = get_logger("holst.serve")
SERVE_DEPS = ("fastapi", "uvicorn", "pydantic")
# The ServeConfig fields with a flag of their own (the rest: --config YAML); device/dtype are the runtime flags.
SERVE_FLAGS = ("host", "port", "workers", "token", "max_queue", "max_batch_images", "max_images_per_request")
SERVE_HELP = {
    "host": f"address to bind (default {ServeConfig.host}; others need --token)",
    "port": f"port (default {ServeConfig.port})",
    "workers": "server processes, each with its own model copy and queue (default 1)",
    "token": "bearer token clients must send (default: $HOLST_TOKEN)",
    "max_queue": f"queued requests before 503 (default {ServeConfig.max_queue})",
    "max_batch_images": f"images sampled together on the device (default {ServeConfig.max_batch_images})",
    "max_images_per_request": f"default {ServeConfig.max_images_per_request}",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``holst serve``: ServeConfig fields (:data:`SERVE_FLAGS`), the runtime flags, the model."""
    parser.add_argument("--model", default=None, help="pipeline directory (default: models/default), or "
                                                      "random:tiny / random:emoji (an untrained pipeline)")
    parser.add_argument("--config", default=None, help="YAML file of ServeConfig values (flags override it)")
    add_dataclass_arguments(parser, ServeConfig, SERVE_FLAGS, helps=SERVE_HELP)
    add_runtime_arguments(parser, device=None, dtype=None)  # None: the ServeConfig's (auto)
    parser.add_argument("--cuda-graph", action="store_true", help="CUDA only: static KV cache + CUDA graph decode")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """ServeConfig from --config YAML, then flags, then $HOLST_TOKEN (ConfigError names a bad value)."""
    config = ServeConfig.load_yaml(args.config) if args.config else ServeConfig()
    changes = given_values(args, (*SERVE_FLAGS, "device", "dtype"))
    if "token" not in changes and config.token is None and os.environ.get("HOLST_TOKEN"):
        changes["token"] = os.environ["HOLST_TOKEN"]
    return config.replace(**changes) if changes else config


def main(args: argparse.Namespace) -> int:
    """Run ``holst serve`` until interrupted; a user's mistake raises a HolstError (one line, exit 2)."""
    config = config_from_args(args)
    missing = [m for m in SERVE_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"holst serve needs {', '.join(missing)}: pip install -e '.[serve]' (or ./setup.sh)")
    from holst.serve.app import make_server
    auth = "; clients must send the bearer token" if config.token else ""
    if config.workers > 1:
        return _main_workers(args, config, auth)
    set_threads(args.threads)
    pipe = load_pipeline(args.model, config.device, config.dtype, cuda_graph=args.cuda_graph)
    try:
        server = make_server(pipe, config)
    except OSError as e:
        raise InputError(f"cannot bind {config.host}:{config.port}: {e.strerror or e}") from None
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    logger.info("serving %s on http://%s:%d/ (API: /openapi.json)%s", pipe.source, shown, port, auth)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _main_workers(args: argparse.Namespace, config: ServeConfig, auth: str) -> int:
    from uvicorn.supervisors import Multiprocess

    from holst.serve.app import SPEC_ENV, bind_socket, uvicorn_config

    os.environ[SPEC_ENV] = json.dumps({"model": args.model, "threads": args.threads, "cuda_graph": args.cuda_graph,
                                       "config": dataclasses.asdict(config)})
    ucfg = uvicorn_config("holst.serve.app:app_from_env", config, factory=True, workers=config.workers)
    try:
        sock = bind_socket(config)
    except OSError as e:
        raise InputError(f"cannot bind {config.host}:{config.port}: {e.strerror or e}") from None
    logger.info("serving %s with %d worker processes on http://%s:%d/%s", args.model or "models/default",
                config.workers, config.host, config.port, auth)
    Multiprocess(ucfg, sockets=[sock]).run()
    return 0
