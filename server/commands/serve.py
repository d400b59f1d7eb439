"""`tinymorph serve`: the HTTP API (OpenAI-compatible completions, steering, metrics) on uvicorn.

`--ray` serves the same API from a Ray Serve deployment of N engine replicas (server/ray_serve.py,
docs/scaling.md): on a local Ray cluster started here, or on an existing one (`--ray-address`).
"""

from __future__ import annotations

import argparse
import os
import sys

from ..cli import UserError
from .common import add_model_options, progress_printer


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the HTTP API (POST /v1/completions, /v1/steering, /metrics, ...)")
    p.add_argument(
        "--host", default="127.0.0.1", help="bind address (default 127.0.0.1; anything else requires a token)"
    )
    p.add_argument("--port", type=int, default=8765)
    p.add_argument(
        "--token", default=None, help="require 'Authorization: Bearer TOKEN' (default: $TINYMORPH_TOKEN)"
    )
    p.add_argument("--context-tokens", type=int, default=1024, help="prompt window in tokens")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_model_options(p)
    ray = p.add_argument_group("Ray Serve (needs the `cluster` extra: pip install 'tinymorph[cluster]')")
    ray.add_argument("--ray", action="store_true", help="serve from a Ray Serve deployment of engine replicas")
    scale = ray.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=None, help="number of replicas (default 1)")
    scale.add_argument("--autoscale", metavar="MIN:MAX", default=None,
                       help="let Ray Serve's autoscaler keep between MIN and MAX replicas")
    ray.add_argument("--replica-cpus", type=float, default=1.0,
                     help="CPUs Ray reserves per replica (fractions allowed; default 1)")
    ray.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per replica (default 0)")
    ray.add_argument("--router", choices=["hash", "multiplex"], default=None,
                     help="how a document finds the replica holding its cache: consistent hashing of its id "
                          "(default) or Ray Serve's model multiplexing (docs/scaling.md)")
    ray.add_argument("--ray-address", default=None,
                     help="an existing Ray cluster (e.g. auto, or HOST:6379); default: start a local one here")
    ray.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    ray.add_argument("--detach", action="store_true",
                     help="with --ray-address: deploy (or rescale) and exit, leaving the deployment running")
    p.set_defaults(func=run)


def _ray_flags_without_ray(args: argparse.Namespace) -> list[str]:
    given = {"--replicas": args.replicas is not None, "--autoscale": args.autoscale is not None,
             "--ray-address": args.ray_address is not None, "--detach": args.detach,
             "--ray-cpus": args.ray_cpus is not None, "--router": args.router is not None}
    return [flag for flag, set_ in given.items() if set_]


def run(args: argparse.Namespace) -> int:
    from ..http_server import TOKEN_ENV, check_exposure, serve
    from ..runtime import ModelSettings, Runtime

    token = args.token or os.environ.get(TOKEN_ENV) or None
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: must be 0..65535")
    try:
        check_exposure(args.host, token)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    settings = ModelSettings(
        model=args.model or "default",
        dtype=args.dtype or "auto",
        threads=args.threads,
        context_tokens=args.context_tokens,
    )
    if args.ray:
        return run_ray(args, settings, token)
    if flags := _ray_flags_without_ray(args):
        raise UserError(f"{', '.join(flags)}: only with --ray")
    runtime = Runtime()
    # load in the background: /healthz answers 503 "loading" until the model is ready
    runtime.load(settings, progress=progress_printer(args.quiet))
    try:
        serve(runtime, args.host, args.port, token)
    except OSError as exc:
        raise UserError(f"cannot serve on {args.host}:{args.port}: {exc.strerror or exc}") from None
    finally:
        runtime.scheduler.stop()
        if runtime.state == "loading":
            # Ctrl-C mid-load: interpreter shutdown under a torch loader thread aborts the process
            # ("terminate called without an active exception"); leave without finalizing instead.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
    return 0


def parse_autoscale(value: str) -> tuple[int, int]:
    """"MIN:MAX" → (min, max), or UserError saying what is wrong."""
    lo, sep, hi = value.partition(":")
    if not sep or not lo.isdigit() or not hi.isdigit() or not 0 < int(lo) <= int(hi):
        raise UserError(f"--autoscale {value!r}: expected MIN:MAX with 1 <= MIN <= MAX, e.g. 1:4")
    return int(lo), int(hi)


def _use_ray_token() -> None:
    """Ray 2.60 protects a cluster it starts with a token (~/.ray/auth_token) but a driver that
    connects to one sends it only with RAY_AUTH_MODE=token: set that when a token is at hand."""
    from pathlib import Path

    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"


def _stop_on_signals() -> None:
    """SIGTERM (kill, systemd, a container stop) shuts down like Ctrl-C: the deployment is deleted and
    every process of a local cluster ends. (Ray's own driver handler exits at once and leaves its
    agents running.) SIGINT is set too: a command started in the background by a script inherits it
    ignored, and `kill -INT` must still stop it, as it stops plain `serve` (uvicorn sets both)."""
    import signal

    def stop(_signum, _frame) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def run_ray(args: argparse.Namespace, settings, token: str | None) -> int:
    """Deploy on Ray Serve and serve until Ctrl-C (or, with --detach, deploy and leave)."""
    if args.port == 0:
        raise UserError("--port 0: Ray Serve's proxy needs a fixed port")
    if args.replicas is not None and args.replicas < 1:
        raise UserError(f"--replicas {args.replicas}: must be at least 1")
    if args.replica_cpus <= 0 or args.replica_gpus < 0:
        raise UserError("--replica-cpus must be > 0 and --replica-gpus >= 0")
    if args.detach and not args.ray_address:
        raise UserError("--detach needs --ray-address: a local cluster ends with this command")
    autoscale = parse_autoscale(args.autoscale) if args.autoscale else None
    if args.ray_address:
        _use_ray_token()  # before Ray is imported: it reads its auth mode once
    else:
        # a single-machine cluster on loopback (Ray would otherwise pick the machine's public address),
        # and no usage report sent to Ray's servers unless the user asks for it
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray

        from .. import ray_serve
    except ImportError as exc:
        raise UserError(f"--ray needs Ray Serve: pip install 'tinymorph[cluster]' ({exc})") from None
    scale = ray_serve.ScaleOptions(replicas=args.replicas or 1, autoscale=autoscale,
                                   replica_cpus=args.replica_cpus, replica_gpus=args.replica_gpus,
                                   router=args.router or "hash")
    options = ray_serve.replica_options(settings, token, args.host, args.replica_cpus)
    config = ray_serve.serve_config(options, scale, args.host, args.port)
    report = progress_printer(args.quiet)
    if args.ray_address:
        ray.init(address=args.ray_address, namespace=ray_serve.NAMESPACE, log_to_driver=False)
    else:
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, namespace=ray_serve.NAMESPACE,
                 log_to_driver=False)
    print(f"[tinymorph] Ray cluster at {ray.get_runtime_context().gcs_address}", file=sys.stderr, flush=True)
    _stop_on_signals()
    try:
        try:
            ray_serve.deploy(config, progress=report)
        except Exception as exc:  # noqa: BLE001 - a failed deployment is the user's message, not a traceback
            raise UserError(f"--ray: {exc}") from None
        shape = f"{autoscale[0]}..{autoscale[1]} replicas" if autoscale else f"{scale.replicas} replica(s)"
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"[tinymorph] HTTP API on http://{host}:{args.port} (Ray Serve, {shape})", file=sys.stderr, flush=True)
        if args.detach:
            return 0
        try:
            import threading

            threading.Event().wait()
        except KeyboardInterrupt:
            pass
    finally:
        if not args.detach:
            if args.ray_address:  # someone else's cluster: remove only this deployment
                ray_serve.undeploy()
            else:  # ours: Serve goes, then the whole local cluster
                from ray import serve

                serve.shutdown()
        ray.shutdown()
    return 0
