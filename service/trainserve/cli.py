"""``trainserve serve | worker | migrate``, and the client commands of ``trainserve.client.cli``
(``train``, ``predict``, ``jobs``, ...); also ``python -m trainserve ...``."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

from trainserve.config import DEVICE_PATTERN
from trainserve.jobs.queue import import_huey
from trainserve.startup import StartError, load_settings, mask, prepare

log = logging.getLogger("trainserve")


def _serve(args: argparse.Namespace) -> int:
    settings = load_settings()
    import_huey(settings.resolved_queue_url)
    # Migrates before any worker starts, so workers never see an old schema. Before the
    # imports below (torch among them: seconds), so that a bad start fails at once.
    prepare(settings)

    import uvicorn

    from trainserve.api.app import create_app
    from trainserve.db import make_engine, make_session_factory
    from trainserve.jobs.queue import build_queue, worker_name
    from trainserve.jobs.rescuer import Rescuer, expire_leases_of, requeue_queued
    from trainserve.storage.factory import open_store
    from trainserve.storage.sweep import sweep

    sessions = make_session_factory(make_engine(settings.resolved_database_url))
    store = open_store(settings)
    sweep(sessions, store, grace_seconds=settings.orphan_grace_seconds)
    queue = build_queue(settings)
    # A job that was running when the service stopped keeps its lease until it runs out,
    # then the rescuer re-queues it: this process cannot know whether a worker on another
    # machine still runs it. Queued jobs go back on the queue at once.
    rescuer = Rescuer(sessions, queue, store, settings)
    rescuer.rescue_now()
    requeue_queued(sessions, queue)
    rescuer.start()
    supervisor = None
    if args.workers:
        supervisor = _WorkerSupervisor(
            args.workers,
            on_death=lambda pid: expire_leases_of(sessions, worker_name(pid)),
            drain_timeout=settings.drain_timeout_seconds,
        )
    # uvicorn stops on SIGINT/SIGTERM once the requests in flight are answered, then raises
    # the signal again for the handler it found; with the default one, the process would
    # die right there, before its workers hand their jobs back.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, lambda signum, _frame: log.info("received %s", signal.Signals(signum).name))

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            # The workers start once the API listens, not before: each imports torch and
            # the rest for seconds, and on a machine of few cores a worker starting beside
            # the API delayed its first answer by a third (bench/start.py). A queued job
            # waits for the worker's start either way. uvicorn exits in super().startup()
            # when it cannot listen, so a failed start spawns no worker.
            if supervisor is not None and not self.should_exit:
                supervisor.start()

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # The workers start handing their jobs back now, while uvicorn answers the
            # requests in flight: a job must not run on to its end during a slow upload.
            if supervisor is not None:
                supervisor.begin_drain()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    try:
        Server(config).run()
    finally:
        if supervisor is not None:
            supervisor.stop()
        rescuer.stop()
    return 0


class _WorkerSupervisor:
    """Keeps N ``trainserve worker`` child processes alive beside the API (the embedded default).

    Training runs in these processes, never in the API's: the API stays responsive while a
    worker saturates the CPU or GPU.
    """

    def __init__(self, count: int, *, on_death: Callable[[int], object], drain_timeout: float) -> None:
        self.count = count
        self.on_death = on_death
        self.drain_timeout = drain_timeout
        self.children: list[subprocess.Popen[bytes]] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)

    def _spawn(self) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "trainserve", "worker", "--exit-with-parent"]
        return subprocess.Popen(command, env=os.environ.copy())

    def start(self) -> None:
        self.children = [self._spawn() for _ in range(self.count)]
        if self.count:
            self._thread.start()

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            for i, child in enumerate(self.children):
                if child.poll() is not None and not self._stopping.is_set():
                    log.warning("worker %s exited with %s; starting a new one", child.pid, child.returncode)
                    try:
                        self.on_death(child.pid)  # its lease can end now: nobody will renew it
                    except Exception:
                        log.exception("could not end the leases of worker %s", child.pid)
                    self.children[i] = self._spawn()

    def begin_drain(self) -> None:
        """Ask every worker to hand its running job back (SIGTERM drains); do not wait."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """Drain the workers (see ``begin_drain``) and wait for them, killing any that overstay."""
        self.begin_drain()
        deadline = time.monotonic() + self.drain_timeout
        for child in self.children:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %s did not drain in %.0f s; killing it", child.pid, self.drain_timeout)
                child.kill()


def _worker(args: argparse.Namespace) -> int:
    settings = load_settings()
    import_huey(settings.resolved_queue_url)  # before the worker's modules import it

    from trainserve.db import make_engine, make_session_factory
    from trainserve.jobs.worker import run_worker
    from trainserve.storage.factory import open_store
    from trainserve.storage.sweep import sweep

    if args.device:
        settings = settings.model_copy(update={"worker_device": args.device})
    prepare(settings)
    log.info(
        "worker on queue %r, training specs with device 'auto' on %s",
        settings.queue_name,
        settings.worker_device or "the first visible GPU, else the CPU",
    )
    if not args.exit_with_parent:  # a worker that `serve` started: serve has swept already
        engine = make_engine(settings.resolved_database_url)
        sweep(
            make_session_factory(engine),
            open_store(settings),
            grace_seconds=settings.orphan_grace_seconds,
        )
        engine.dispose()
    run_worker(settings, exit_with_parent=args.exit_with_parent)
    return 0


def _device(value: str) -> str:
    if not DEVICE_PATTERN.match(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device: use cpu, cuda, cuda:N or mps")
    return value


def _migrate(_args: argparse.Namespace) -> int:
    settings = load_settings()
    prepare(settings)  # migrates
    print(f"database {mask(settings.resolved_database_url)} is at the newest schema")
    return 0


def _check(_args: argparse.Namespace) -> int:
    from trainserve.api.runtime import Runtime

    try:
        runtime = Runtime.from_settings(load_settings())
    except StartError:
        raise
    except Exception as exc:  # a queue on Postgres or SQLite connects as soon as it is built
        print(f"error: {exc}")
        return 1
    try:
        checks = runtime.check()
    finally:
        runtime.engine.dispose()
        runtime.queue.close()
    for name, result in checks.items():
        print(f"{name}: {result}")
    return 0 if all(result == "ok" for result in checks.values()) else 1


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default shown, and the epilog's lines kept as written."""


def _where_data_lives() -> str:
    """The help's epilog: where the service would keep its data if started here and now."""
    try:
        settings = load_settings()
    except StartError as exc:  # help must still show; the command itself will refuse to start
        return str(exc)
    store = mask(settings.store_url) if settings.store_url else str(settings.resolved_store_dir)
    return (
        "where the data lives (from the TRAINSERVE_* variables and the current folder):\n"
        f"  data dir  {settings.data_dir.resolve()}  (TRAINSERVE_DATA_DIR, default: the current folder)\n"
        f"  database  {mask(settings.resolved_database_url)}  (TRAINSERVE_DATABASE_URL)\n"
        f"  queue     {mask(settings.resolved_queue_url)}  (TRAINSERVE_QUEUE_URL)\n"
        f"  store     {store}  (TRAINSERVE_STORE_URL, TRAINSERVE_STORE_DIR)"
    )


# The commands that run the service: they need neither the HTTP client (httpx) nor tqdm,
# whose imports took 0.5 s of every `serve` and every worker's start (bench/start.py).
SERVICE_COMMANDS = frozenset({"serve", "worker", "migrate", "check"})


def build_parser(*, client_commands: bool = True) -> argparse.ArgumentParser:
    """``trainserve``'s parser; ``client_commands=False`` leaves out (and does not import) the client's."""
    parser = argparse.ArgumentParser(
        prog="trainserve",
        description="Train PyTorch models described in JSON and serve their predictions: run the service "
        "(serve, worker, migrate) or talk to one (train, follow, predict, jobs, models, cancel, plot, export).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    where = _where_data_lives()
    serve = commands.add_parser(
        "serve", help="run the API and its worker(s) on this machine", epilog=where, formatter_class=_HelpFormatter
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--workers", type=int, default=1, help="worker processes to start beside the API (0: API only)")
    serve.add_argument("--log-level", default="info", help="uvicorn's log level")
    serve.set_defaults(run=_serve)
    worker = commands.add_parser(
        "worker",
        help="run a training worker only, one per GPU (SIGTERM/SIGINT: hand the job back, exit)",
        epilog=where,
        formatter_class=_HelpFormatter,
    )
    worker.add_argument(
        "--device",
        type=_device,
        default=None,
        help="where specs with device 'auto' train, e.g. cuda:1 (default: TRAINSERVE_WORKER_DEVICE, "
        "else the first GPU that CUDA_VISIBLE_DEVICES leaves visible, else the CPU)",
    )
    worker.add_argument(
        "--exit-with-parent", action="store_true", help="drain and exit when the process that started it dies"
    )
    worker.set_defaults(run=_worker)
    migrate = commands.add_parser(
        "migrate",
        help="upgrade the database schema to the newest version",
        epilog=where,
        formatter_class=_HelpFormatter,
    )
    migrate.set_defaults(run=_migrate)
    check = commands.add_parser(
        "check", help="exit 0 when the database, queue and model store answer (a worker's health check)"
    )
    check.set_defaults(run=_check)
    if client_commands:
        from trainserve.client.cli import add_client_commands

        add_client_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    first = (sys.argv[1:] if argv is None else argv)[:1]
    if first == ["serve"]:
        # No cyclic collection while `serve` starts: everything imported and built then
        # lives as long as the process, so each full pass the imports trigger walks it all
        # and frees nothing (with torch, ~300,000 objects, a fifth of the start's CPU time:
        # bench/start.py). The app's lifespan freezes what the start built; its warm-up
        # loads torch, freezes that too and turns the collector back on (api/app.py).
        gc.disable()
    args = build_parser(client_commands=not SERVICE_COMMANDS.issuperset(first) or not first).parse_args(argv)
    try:
        result: int = args.run(args)
    except StartError as exc:  # one line for the operator; the traceback would bury it
        print(f"trainserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return result
