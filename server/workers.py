"""`funnelgate serve --workers N`: N processes on one host, one listening socket.

uvicorn's own machinery, as its `--workers` does (uvicorn/main.py): the supervisor binds the
socket, and uvicorn.supervisors.Multiprocess spawns the workers, hands each the socket, pings
them, replaces one that dies or hangs, and on SIGTERM or SIGINT sends each SIGTERM and waits
for it. A worker is the whole app (WorkerApp rebuilds it from the config file): its own
dispatcher, writer and tally, which meet the others' in the database (claims are leases, the
per-minute counters add up). The kernel spreads connections over the workers' accept calls.

What is per process and must hold across workers:
- the metrics: prometheus-client's multiprocess mode, in a private directory the supervisor
  makes, names in PROMETHEUS_MULTIPROC_DIR before the first worker starts, and removes at
  the end (server/metrics.py);
- the console's sessions: signed cookies that any worker opens (server/console/auth.py).

Checked once, in the supervisor, before any worker starts: the config, the secret key against
the stored tokens (server/cli.py), the database and its schema, the listening socket and
the metrics port. A worker that fails to start stops the whole server (uvicorn's rule: it would
fail the same way each time); one that dies later is replaced.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client.multiprocess import mark_process_dead
from starlette.applications import Starlette
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from server import logs
from server.config import Config, load_config
from server.errors import ConfigError

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client reads it when first imported
# Past a worker's own shutdown budget ([server] shutdown_seconds: half for the calls in
# flight, half for the dispatcher's sends), the supervisor waits this long, then kills it.
STOP_MARGIN_SECONDS = 5.0


@dataclass(frozen=True)
class WorkerApp:
    """The app factory each worker calls (uvicorn's `factory=True`; pickled to the worker,
    hence a path and not the parsed config, whose keys do not pickle)."""

    config_path: str
    metrics_dir: str

    def __call__(self) -> Starlette:
        from server import metrics  # noqa: PLC0415 - in the worker, not the supervisor
        from server.app import create_app  # noqa: PLC0415

        metrics.share_between_workers(self.metrics_dir)
        try:
            # The same file and environment the supervisor checked; if the file changed
            # since and no longer loads, this worker does not start, and neither does any.
            config = load_config(Path(self.config_path), dict(os.environ))
            app = create_app(config)
        except ConfigError as exc:
            logs.log("worker_start_failed", logging.ERROR, error=str(exc))
            sys.exit(STARTUP_FAILURE)
        _freeze_after_startup(app)
        return app


def _freeze_after_startup(app: Starlette) -> None:
    """gc.freeze() once the app has started (as serve's FrozenAfterStartup does in a single
    process): the lifespan wrapped, so requests pay nothing for it."""
    started = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(served: Any) -> AsyncIterator[Any]:
        async with started(served) as state:
            gc.freeze()
            yield state

    app.router.lifespan_context = lifespan


class WorkerConfig(uvicorn.Config):
    """uvicorn's settings, pickled to each worker. Logging is configured again in every new
    process (uvicorn's subprocess_started calls this first): funnelgate's JSON lines, and
    the SIGTERM handler that writes them out before the process dies of the signal. Set
    here, before the server runs, so uvicorn finds it, shuts down gracefully, then calls it."""

    def configure_logging(self) -> None:
        super().configure_logging()
        if multiprocessing.parent_process() is not None:  # a worker; the supervisor has its own
            logs.configure()
            signal.signal(signal.SIGTERM, logs.flush_then_reraise)


class Supervisor(Multiprocess):
    """uvicorn's Multiprocess, plus: a dead worker's live gauges (in-flight) marked dead; a
    worker that failed to start remembered (the exit status); a bounded wait for the workers
    to stop."""

    def __init__(
        self, config: WorkerConfig, sockets: list[Any], *, metrics_dir: str, stop_seconds: float
    ) -> None:
        super().__init__(config, sockets)
        self.metrics_dir = metrics_dir
        self.stop_seconds = stop_seconds
        self.failed_start = False

    def keep_subprocess_alive(self) -> None:
        before = list(self.processes)
        super().keep_subprocess_alive()
        for process in before:
            if process.exitcode is not None and not self.should_exit.is_set():
                logs.log("worker_replaced", logging.WARNING, pid=process.pid,
                         exit_code=process.exitcode)  # fmt: skip
        self._bury(before)

    def restart_all(self) -> None:  # SIGHUP: replaced one by one
        before = list(self.processes)
        super().restart_all()
        self._bury(before)

    def handle_ttou(self) -> None:  # SIGTTOU: one fewer
        before = list(self.processes)
        super().handle_ttou()
        self._bury(before)

    def join_all(self) -> None:
        deadline = time.monotonic() + self.stop_seconds
        for process in self.processes:
            process.process.join(max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process.exitcode is None:
                logs.log("worker_killed", logging.ERROR, pid=process.pid,
                         after_seconds=self.stop_seconds)  # fmt: skip
                process.kill()
                process.join()
        self._bury(self.processes)

    def _bury(self, processes: Iterable[Process]) -> None:
        for process in processes:
            if process.exitcode is None:
                continue
            if process.exitcode == STARTUP_FAILURE:
                self.failed_start = True
            if process.pid is not None:
                mark_process_dead(process.pid, self.metrics_dir)  # type: ignore[no-untyped-call]


def serve(
    config: Config,
    config_path: Path,
    *,
    host: str,
    port: int,
    count: int,
    options: dict[str, Any],
) -> int:
    """Runs `count` workers until SIGTERM or SIGINT; the exit status (3: a worker failed to
    start). `options` are uvicorn's settings, as a single process has them."""
    from server.metrics import MetricsPort, WorkerTotals  # noqa: PLC0415
    from server.storage.database import Database, open_database  # noqa: PLC0415
    from server.storage.schema import upgrade_schema  # noqa: PLC0415

    # The schema brought up to date here, before any worker: each worker's start then finds
    # it current and only reads the version.
    upgrade_schema(config.storage)
    metrics_dir = tempfile.mkdtemp(prefix="funnelgate-metrics-")  # 0700, fresh: no old counts
    os.environ[MULTIPROC_ENV] = metrics_dir  # before the first worker: they inherit it
    settings = WorkerConfig(
        WorkerApp(str(config_path), metrics_dir),
        factory=True,
        workers=count,
        host=host,
        port=port,
        **options,
    )
    sock = None
    totals: WorkerTotals | None = None
    database: Database | None = None
    metrics_port: MetricsPort | None = None
    try:
        sock = settings.bind_socket()  # a port in use: logged, exit status 3
        if config.metrics.enabled and config.metrics.port is not None:
            totals = WorkerTotals(metrics_dir)
            database = open_database(config.storage.database_path, config.storage.url)
            totals.watch(database)
            metrics_port = MetricsPort(
                totals, host=config.metrics.host, port=config.metrics.port,
                path=config.metrics.path,
            )  # fmt: skip
            try:
                asyncio.run(metrics_port.start())
            except OSError:  # in use, or not ours: logged with the reason
                metrics_port = None
                return STARTUP_FAILURE
            except RuntimeError as exc:
                logs.log("metrics_port_failed", logging.ERROR, error=str(exc))
                metrics_port = None
                return STARTUP_FAILURE
        supervisor = Supervisor(
            settings, [sock], metrics_dir=metrics_dir,
            stop_seconds=config.server.shutdown_seconds + STOP_MARGIN_SECONDS,
        )  # fmt: skip
        logs.log("workers_starting", workers=count, pid=os.getpid())
        supervisor.run()
        return STARTUP_FAILURE if supervisor.failed_start else 0
    finally:
        if metrics_port is not None:
            metrics_port.stop()
        if totals is not None:
            totals.unwatch()
        if database is not None:
            database.close()
        if sock is not None:
            sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
