"""The `distill` console script: the ML commands of ml_core.cli, plus `serve` and `worker`."""
from __future__ import annotations

import sys

from ml_core import cli as ml_cli


def main(argv: list[str] | None = None) -> int:
    parser = ml_cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    s = sub.add_parser("serve", help="run the web app: Redis, a Celery worker and the web server")
    s.add_argument("--host", default=None, help="bind address (default DISTILL_HOST or 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="port (default DISTILL_PORT or 8000)")
    s.add_argument("--no-demo", action="store_true", help="do not create the demo project")
    s.add_argument("--no-worker", action="store_true", help="do not start a Celery worker")
    s.set_defaults(func=lambda args: sys.exit(_serve(args)))
    s = sub.add_parser("worker", help="run a Celery worker (queues from DISTILL_QUEUES, default gpu,cpu)")
    s.add_argument("--queues", default=None)
    s.add_argument("--concurrency", type=int, default=1)
    s.set_defaults(func=lambda args: sys.exit(_worker(args)))
    return ml_cli.main(argv, parser)


def _serve(args) -> int:
    from distill_app.serve import serve
    return serve(host=args.host, port=args.port, demo=not args.no_demo, worker=not args.no_worker)


def _worker(args) -> int:
    from distill_app.serve import run_worker
    return run_worker(args.queues, args.concurrency)


if __name__ == "__main__":
    sys.exit(main())
