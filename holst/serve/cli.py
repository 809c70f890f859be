"""``holst serve`` command line: flags and ``--config`` into a ServeConfig, then uvicorn (see :mod:`holst.serve.app`).

Kept apart from the app so that a missing ``serve`` extra is one clear line, not an ImportError.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os

from holst.config import ServeConfig
from holst.utils.runtime import get_logger

logger = get_logger("holst.serve")
SERVE_DEPS = ("fastapi", "uvicorn", "pydantic")




def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``holst serve``."""
    d = ServeConfig()
    parser.add_argument("--model", default=None, help="pipeline directory (default: models/default)")
    parser.add_argument("--config", default=None, help="YAML file of ServeConfig values (flags override it)")
    parser.add_argument("--host", default=None, help=f"address to bind (default {d.host}; others need --token)")
    parser.add_argument("--port", type=int, default=None, help=f"port (default {d.port})")
    parser.add_argument("--workers", type=int, default=None,
                        help="server processes, each with its own model copy and queue (default 1)")
    parser.add_argument("--token", default=None, help="bearer token clients must send (default: $HOLST_TOKEN)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1, mps (default auto)")
    parser.add_argument("--dtype", default=None, help="auto, fp32, bf16, fp16 for the transformer (default auto)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--cuda-graph", action="store_true", help="CUDA only: static KV cache + CUDA graph decode")
    parser.add_argument("--max-queue", type=int, default=None,
                        help=f"queued requests before 503 (default {d.max_queue})")
    parser.add_argument("--max-batch-images", type=int, default=None,
                        help=f"images sampled together on the device (default {d.max_batch_images})")
    parser.add_argument("--max-images-per-request", type=int, default=None,
                        help=f"default {d.max_images_per_request}")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """ServeConfig from --config YAML, then flags, then $HOLST_TOKEN."""
    config = ServeConfig.load_yaml(args.config) if args.config else ServeConfig()
    changes = {k: getattr(args, k) for k in ("host", "port", "token", "device", "dtype", "max_queue",
                                             "max_batch_images", "max_images_per_request", "workers")
               if getattr(args, k, None) is not None}
    if "token" not in changes and config.token is None and os.environ.get("HOLST_TOKEN"):
        changes["token"] = os.environ["HOLST_TOKEN"]
    return config.replace(**changes) if changes else config


def main(args: argparse.Namespace) -> int:
    """Run ``holst serve`` until interrupted."""
    from holst.config import ConfigError
    from holst.generate_cli import load_pipeline_for_cli, set_threads

    try:
        config = config_from_args(args)
    except ConfigError as e:
        logger.error("%s", e)
        return 2
    missing = [m for m in SERVE_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        logger.error("holst serve needs %s: pip install -e '.[serve]' (or ./setup.sh)", ", ".join(missing))
        return 2
    from holst.serve.app import make_server
    auth = "; clients must send the bearer token" if config.token else ""
    if config.workers > 1:
        return _main_workers(args, config, auth)
    set_threads(args.threads)
    pipe = load_pipeline_for_cli(args.model, config.device, config.dtype, cuda_graph=args.cuda_graph)
    if pipe is None:
        return 2
    try:
        server = make_server(pipe, config)
    except OSError as e:
        logger.error("cannot bind %s:%d: %s", config.host, config.port, e.strerror or e)
        return 2
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
        logger.error("cannot bind %s:%d: %s", config.host, config.port, e.strerror or e)
        return 2
    logger.info("serving %s with %d worker processes on http://%s:%d/%s", args.model or "models/default",
                config.workers, config.host, config.port, auth)
    Multiprocess(ucfg, sockets=[sock]).run()
    return 0
