"""``smtpgate serve`` with several worker processes (``gateway.workers`` > 1).

The supervisor does no mail work. It binds every listener's sockets (as root
when the ports need it), starts the API process, drops privileges, then starts
``count`` workers (``smtpgate worker``), each a whole gateway with its own
event loop (``app.serve_worker``) accepting on the same inherited sockets:
whichever worker is free accepts the next connection, so one busy or slow
worker never holds up the others. The workers share the queue database; each
delivers the messages it queued (``queue.store.Owner``), so delivery spreads
over the cores as reception does.

* A worker that dies is started again with the same index after a pause
  (doubling while it keeps dying at once); it recovers its messages from the
  queue like a restarted gateway, so every message that got 250 is delivered.
  Its share of the connection counts is forgotten.
* SIGTERM/SIGINT: each worker stops gracefully (sessions finish their
  message within ``timeouts.shutdown_grace``); a worker still running
  :data:`STOP_MARGIN` seconds after that is killed. SIGHUP (``smtpgate
  reload``) reaches every worker.
* A worker leaves when the supervisor dies (``PR_SET_PDEATHSIG``): a killed
  supervisor is a crash of the gateway, never workers left holding the ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from smtpgate.admin import nodes
from smtpgate.app import (
    WORKERS_DIR,
    api_process,
    drop_privileges,
    tidy_data_dir,
)
from smtpgate.config.document import local_part, merge, shared_part, to_document
from smtpgate.config.schema import GatewayConfig
from smtpgate.config.store import ConfigStore
from smtpgate.files import private_dir
from smtpgate.inbound import throttle
from smtpgate.inbound.counts import SharedCounts
from smtpgate.inbound.server import stop_requested
from smtpgate.observe.log import get_logger, log_options
from smtpgate.privileges import Drop

log = get_logger("smtpgate.supervisor")

STOP_MARGIN = 15.0  # seconds a worker has beyond shutdown_grace before it is killed
START_TIMEOUT = 60.0  # seconds a worker has to say it is ready
RESTART_PAUSE = 1.0  # seconds before a dead worker starts again ...
RESTART_PAUSE_MAX = 30.0  # ... doubling up to this while it dies within
QUICK_DEATH = 10.0  # seconds of its start


def worker_count(config: GatewayConfig) -> int:
    """How many worker processes ``serve`` runs: the setting, or one per core
    this process may run on (its CPU affinity, as a container or taskset sets it)."""
    return config.gateway.workers or len(os.sched_getaffinity(0)) or 1


def worker_cpu(config: GatewayConfig, index: int) -> int | None:
    """The CPU worker ``index`` is pinned to (``gateway.cpu_affinity``
    per-core: the CPUs this process may use, in turn), or None."""
    if config.gateway.cpu_affinity != "per-core":
        return None
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[index % len(cpus)]


def bind_listeners(config: GatewayConfig) -> dict[str, list[socket.socket]]:
    """Every listener's listening sockets (one per address its host resolves
    to, as asyncio binds them); OSError naming the listener when one cannot be
    bound."""
    bound: dict[str, list[socket.socket]] = {}
    try:
        for listener in config.listeners:
            bound[listener.name] = _bind(listener.name, listener.host, listener.port)
    except OSError:
        for sockets in bound.values():
            for sock in sockets:
                sock.close()
        raise
    return bound


def _bind(name: str, host: str, port: int) -> list[socket.socket]:
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise OSError(f"listener {name!r} cannot resolve {host!r}: {exc}") from exc
    sockets: list[socket.socket] = []
    seen = set()
    for family, kind, proto, _name, address in infos:
        if address in seen:
            continue
        seen.add(address)
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # the IPv4 socket, if any, takes IPv4
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)  # not listen(): the first worker that starts does, so
            sock.setblocking(False)  # a client is refused, not kept waiting, until one serves
        except OSError as exc:
            sock.close()
            for other in sockets:
                other.close()
            reason = exc.strerror or str(exc)
            raise OSError(f"listener {name!r} cannot listen on {host}:{port}: {reason}") from exc
        sockets.append(sock)
    return sockets


@dataclass
class Worker:
    """One worker process and what it needs to be started again."""

    index: int
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    pause: float = RESTART_PAUSE


@dataclass
class Supervisor:
    config: GatewayConfig  # as started: the node's local settings, the first revision
    revision: int | None
    count: int
    sockets: dict[str, list[socket.socket]]
    connections: Path
    counts: SharedCounts
    workers: list[Worker] = field(default_factory=list)
    stopping: bool = False
    requested: asyncio.Event | None = None  # the stop request (SIGTERM, SIGINT)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def data_dir(self) -> Path:
        return self.config.gateway.data_dir

    def _fds(self) -> tuple[str, list[int]]:
        """The ``--fds`` argument (``name=fd,fd;name=fd``) and the fds to pass."""
        parts, fds = [], []
        for name, sockets in self.sockets.items():
            numbers = [s.fileno() for s in sockets]
            fds += numbers
            parts.append(f"{name}=" + ",".join(map(str, numbers)))
        return ";".join(parts), fds

    def _starting_document(self) -> tuple[int | None, dict[str, object]]:
        """What a (re)started worker runs at first: the newest revision this node
        took on (the first worker keeps it), with the node's own settings; the
        worker then follows the store like any node."""
        started = to_document(self.config)
        cached = nodes.cached_applied(self.data_dir)
        if cached is None or (self.revision is not None and cached[0] < self.revision):
            return self.revision, started
        return cached[0], merge(shared_part(cached[1]), local_part(started))

    async def spawn(self, worker: Worker, *, first: bool = False) -> bool:
        """Start ``worker``; whether it said it is ready. A worker that does not
        start is killed; at the first start that stops the gateway (the same
        configuration would fail again), later it is tried again."""
        fds_arg, fds = self._fds()
        revision, document = self._starting_document()
        command = [sys.executable, "-m", "smtpgate.cli.main", "worker"]
        command += ["--index", str(worker.index), "--count", str(self.count)]
        command += ["--fds", fds_arg, "--connections", str(self.connections)]
        command += ["--parent", str(os.getpid()), *log_options()]
        cpu = worker_cpu(self.config, worker.index)
        if cpu is not None:
            command += ["--cpu", str(cpu)]
        process = await asyncio.create_subprocess_exec(
            *command,
            pass_fds=fds,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        # known at once: a stop that comes while it starts must reach it too
        worker.process, worker.started = process, time.monotonic()
        if self.stopping:
            process.terminate()
        assert process.stdin is not None
        assert process.stdout is not None
        process.stdin.write(json.dumps({"revision": revision, "document": document}).encode())
        await process.stdin.drain()
        process.stdin.close()
        try:
            async with asyncio.timeout(START_TIMEOUT):
                line = await process.stdout.readline()
        except TimeoutError:
            line = b""
        ready = line.strip() == b"ready"
        if not ready:
            log.error("worker did not start", worker=worker.index, pid=process.pid)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            if first:
                await process.wait()
                return False
        self._watch(worker, process)
        return ready

    def _watch(self, worker: Worker, process: asyncio.subprocess.Process) -> None:
        task = asyncio.get_running_loop().create_task(self._after(worker, process))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _after(self, worker: Worker, process: asyncio.subprocess.Process) -> None:
        """Wait for the worker's end; unless the gateway stops, start it again."""
        code = await process.wait()
        self.counts.forget_worker(worker.index)  # its connections are gone
        await asyncio.sleep(0)  # a Ctrl-C reaches the workers too: let ours be seen first
        if self.stopping or (self.requested is not None and self.requested.is_set()):
            return
        log.error("worker died", worker=worker.index, pid=process.pid, exit_code=code)
        quick = time.monotonic() - worker.started < QUICK_DEATH
        worker.pause = min(worker.pause * 2, RESTART_PAUSE_MAX) if quick else RESTART_PAUSE
        await asyncio.sleep(worker.pause)
        if self.stopping:
            return
        await self.spawn(worker)
        log.info("worker started again", worker=worker.index, pid=_pid(worker))

    def reload(self) -> None:
        """SIGHUP: every worker reloads its certificates."""
        self._signal_all(signal.SIGHUP)

    def _signal_all(self, signum: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signum)

    async def stop(self, grace: float) -> None:
        """Every worker stops gracefully; one that does not in time is killed.
        A worker whose restart is under way when the stop comes is stopped
        too: its process is known (and told to stop) only once created, so the
        running ones are looked for again after each wait."""
        self.stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace + STOP_MARGIN
        while running := [p for w in self.workers if (p := w.process) and p.returncode is None]:
            self._signal_all(signal.SIGTERM)
            waits = [asyncio.ensure_future(p.wait()) for p in running]
            _, late = await asyncio.wait(waits, timeout=max(0.0, deadline - loop.time()))
            if late:
                log.error("workers did not stop in time: killed", count=len(late))
                for process in running:
                    if process.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            process.kill()
                await asyncio.gather(*late, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()


def _pid(worker: Worker) -> int | None:
    return worker.process.pid if worker.process is not None else None


def prepare(config: GatewayConfig) -> None:
    """What must happen once, before any worker runs: private files, and the
    clean-up of files a crash left (a worker's own start cannot tell them from
    another running worker's)."""
    data_dir = config.gateway.data_dir
    tidy_data_dir(data_dir)
    throttle.create(private_dir(data_dir / WORKERS_DIR))  # AUTH failures of this run


async def serve(
    config: GatewayConfig,
    store: ConfigStore | None = None,
    revision: int | None = None,
    drop: Drop | None = None,
) -> None:
    """Run ``worker_count(config)`` workers until SIGTERM or SIGINT."""
    stop = stop_requested()
    async with api_process(config, store, drop) as api:
        await _supervise(config, revision, drop, (stop, api))


async def _supervise(
    config: GatewayConfig,
    revision: int | None,
    drop: Drop | None,
    running: tuple[asyncio.Event, asyncio.subprocess.Process | None],
) -> None:
    stop, api = running
    data_dir, count = config.gateway.data_dir, worker_count(config)
    sockets = bind_listeners(config)
    prepare(config)
    connections = data_dir / WORKERS_DIR / "connections"
    counts = SharedCounts.create(connections, count, config.limits.max_connections)
    if drop is not None:  # the ports are bound: nothing needs root any more
        drop_privileges(drop, data_dir)
    supervisor = Supervisor(config, revision, count, sockets, connections, counts)
    supervisor.requested = stop
    supervisor.workers = [Worker(i) for i in range(count)]
    pid_file = data_dir / "smtpgate.pid"
    loop = asyncio.get_running_loop()
    try:
        workers = supervisor.workers
        started = await asyncio.gather(*(supervisor.spawn(w, first=True) for w in workers))
        failed = [str(w.index) for w, ok in zip(workers, started, strict=True) if not ok]
        if failed:
            raise OSError(f"worker {', '.join(failed)} of {count} did not start (see the log)")
        pid_file.write_text(f"{os.getpid()}\n")
        loop.add_signal_handler(signal.SIGHUP, supervisor.reload)
        log.info(
            "gateway ready",
            node=config.gateway.node,
            hostname=config.gateway.hostname,
            revision=revision,
            workers=count,
            pids=[_pid(w) for w in supervisor.workers],
        )
        await stop.wait()
        log.info("shutting down", grace=config.timeouts.shutdown_grace)
        if api is not None:
            api.terminate()  # no admin changes while the gateway winds down
        await supervisor.stop(config.timeouts.shutdown_grace)
    finally:
        if not supervisor.stopping:  # the start failed: take the workers down
            await supervisor.stop(0)
        pid_file.unlink(missing_ok=True)
        for bound in sockets.values():
            for sock in bound:
                sock.close()
        counts.close()


def run(
    config: GatewayConfig,
    store: ConfigStore | None = None,
    revision: int | None = None,
    *,
    drop: Drop | None = None,
) -> None:
    """The supervisor's event loop (it only waits: the standard loop will do)."""
    asyncio.run(serve(config, store, revision, drop))
