"""A loopback TCP proxy that can delay, cut and blackhole connections, for tests.

Two things need a network between a client and Redis or RabbitMQ that a test
controls: the state-access benchmark measures remote state against a Redis a
fraction of a millisecond away (``delay``), and the nemesis cuts the workers'
broker connections and restores them (``cut``, ``blackhole``, ``restore``). A
process-local proxy is the smallest thing that does both without root (no
``tc``/``iptables``) and without Docker.

The proxy runs in a child process (``spawn``) so that its event loop never waits
for the caller's GIL (a step that unpickles 100 MB would delay it otherwise), and it
stops by itself when the caller goes away (its control pipe closes).

Modes:

- ``open``: forward every chunk, ``delay`` seconds after it arrived, each way;
- ``cut``: close every connection now and close new ones as soon as they arrive,
  like a peer that resets (the client sees a connection error at once);
- ``blackhole``: keep connections open but forward nothing, like a partition or a
  pulled cable (the client only notices by its own timeouts or heartbeats); data
  that arrived meanwhile flows again when the mode goes back to ``open``.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.process
import selectors
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import urlsplit, urlunsplit

PROXY_CHUNK = 1 << 18
MODES = ("open", "cut", "blackhole")


def _proxy_main(conn: Connection, host: str, port: int, delay: float) -> None:
    """Child process entry point: serve until the parent says stop (or goes away)."""
    # select() takes microsecond timeouts; epoll and poll round 0.5 ms up to 1 ms.
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
    try:
        loop.run_until_complete(_serve(conn, host, port, delay))
    finally:
        loop.close()
        conn.close()


class _Setting:
    """What the parent set: the delay each way and the mode, with an event for ``open``."""

    def __init__(self, delay: float) -> None:
        self.each_way = delay
        self.mode = "open"
        self.flowing = asyncio.Event()
        self.flowing.set()

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        if mode == "blackhole":
            self.flowing.clear()
        else:
            self.flowing.set()


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, setting: _Setting
) -> None:
    """Forward one direction, each chunk ``setting.each_way`` after it arrived, in order.

    Chunks are queued rather than slept on in line, so the delay is latency only:
    a large transfer is not also slowed by one delay per chunk. While the mode is
    ``blackhole`` chunks wait in the queue.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

    async def forward() -> None:
        while (item := await queue.get()) is not None:
            due, data = item
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            await setting.flowing.wait()
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(forward())
    try:
        while data := await reader.read(PROXY_CHUNK):
            queue.put_nowait((loop.time() + setting.each_way, data))
    finally:
        queue.put_nowait(None)
        try:
            await sender
        finally:
            writer.close()


async def _serve(conn: Connection, host: str, port: int, delay: float) -> None:
    """Accept connections until the parent sends "stop" (or dies).

    Commands: a float sets the delay; a mode name (``MODES``) sets the mode.
    """
    loop = asyncio.get_running_loop()
    setting = _Setting(delay)
    handlers: set[asyncio.Task[Any]] = set()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        upstream_w: asyncio.StreamWriter | None = None
        if setting.mode == "cut":
            client_w.close()
            return
        handlers.add(task)
        try:
            upstream_r, upstream_w = await asyncio.open_connection(host, port, limit=PROXY_CHUNK)
            # Each pump closes its writer when it ends, which ends the other one.
            await asyncio.gather(
                _pump(client_r, upstream_w, setting),
                _pump(upstream_r, client_w, setting),
                return_exceptions=True,
            )
        except (OSError, asyncio.CancelledError):
            pass  # upstream refused, cut, or the proxy is stopping: just close
        finally:
            _abort(client_w)
            if upstream_w is not None:
                _abort(upstream_w)
            handlers.discard(task)

    try:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=PROXY_CHUNK)
    except OSError as exc:
        conn.send(f"cannot listen: {exc}")
        return
    conn.send(server.sockets[0].getsockname()[1])
    stop = asyncio.Event()

    def command() -> None:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            message = "stop"  # the parent went away
        if isinstance(message, float):
            setting.each_way = message
            conn.send("ok")
        elif message in MODES:
            setting.set_mode(message)
            if message == "cut":
                for task in list(handlers):
                    task.cancel()
            conn.send("ok")
        else:
            stop.set()

    loop.add_reader(conn.fileno(), command)
    await stop.wait()
    loop.remove_reader(conn.fileno())
    server.close()
    for task in list(handlers):
        task.cancel()
    await asyncio.gather(*handlers, return_exceptions=True)
    await server.wait_closed()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close now, with a reset rather than a graceful FIN when possible."""
    transport = writer.transport
    with contextlib.suppress(Exception):
        transport.abort()


class TcpProxy:
    """A loopback TCP proxy to ``host:port``: delay each way, cut, blackhole, restore.

    Use as a context manager; ``port`` is where clients connect and :meth:`url`
    rewrites a URL to go through it::

        with TcpProxy("127.0.0.1", 6379) as proxy:
            broker = proxy.url("redis://127.0.0.1:6379/12")
            ...
            proxy.cut()       # every connection through it fails now
            proxy.restore()
    """

    def __init__(self, host: str, port: int, delay: float = 0.0) -> None:
        self.upstream = (host, port)
        self.delay = delay
        self.mode = "open"
        self.port = 0
        self._conn: Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None

    @classmethod
    def to(cls, url: str, delay: float = 0.0) -> TcpProxy:
        """A proxy to the host and port of ``url`` (Redis or AMQP)."""
        parts = urlsplit(url)
        default = 5672 if parts.scheme.startswith("amqp") else 6379
        return cls(parts.hostname or "127.0.0.1", parts.port or default, delay)

    def __enter__(self) -> TcpProxy:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        process = context.Process(
            target=_proxy_main,
            args=(child, *self.upstream, self.delay),
            name="sticky-tcp-proxy",
            daemon=True,
        )
        process.start()
        child.close()
        self._conn, self._process = parent, process
        message = self._receive("start", timeout=60)
        if isinstance(message, str):
            self.__exit__()
            raise RuntimeError(f"the TCP proxy failed: {message}")
        self.port = int(message)
        return self

    def url(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's."""
        parts = urlsplit(url)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@127.0.0.1:{self.port}" if auth else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def set_delay(self, delay: float) -> None:
        """Change the delay each way; returns once the proxy applies it."""
        self._command(float(delay), "set the delay")
        self.delay = delay

    def cut(self) -> None:
        """Reset every connection and refuse new ones until :meth:`restore`."""
        self._command("cut", "cut")
        self.mode = "cut"

    def blackhole(self) -> None:
        """Forward nothing (connections stay open) until :meth:`restore`."""
        self._command("blackhole", "blackhole")
        self.mode = "blackhole"

    def restore(self) -> None:
        """Forward again: new connections go through, held data flows."""
        self._command("open", "restore")
        self.mode = "open"

    def _command(self, message: Any, what: str) -> None:
        assert self._conn is not None, "the proxy is not running"
        self._conn.send(message)
        self._receive(what, timeout=10)

    def _receive(self, what: str, timeout: float) -> Any:
        assert self._conn is not None
        if not self._conn.poll(timeout):
            self.__exit__()
            raise RuntimeError(f"the TCP proxy did not {what} within {timeout:g} s")
        return self._conn.recv()

    def __exit__(self, *exc: object) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send("stop")
            self._conn.close()
            self._conn = None
        if self._process is not None:
            self._process.join(10)
            if self._process.is_alive():
                self._process.terminate()
                self._process.join(10)
            self._process = None


#: The name the state-access benchmark knows it by.
LatencyProxy = TcpProxy
