"""Redis servers the connection tests start: a TLS server with an ACL user, and a
master, a replica and a sentinel. Skipped, with the reason, when this machine's
redis-server cannot (no binary, no TLS support, no openssl)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def binary(*, tls: bool = False) -> str:
    """A redis-server that can do what is asked, or skip the test saying why."""
    candidates = [p for p in ("/usr/bin/redis-server", shutil.which("redis-server")) if p]
    for path in dict.fromkeys(candidates):
        if not os.path.exists(path):
            continue
        if not tls:
            return path
        probe = subprocess.run(
            [path, "--port", "0", "--tls-port", "0"],  # exits: listens nowhere
            capture_output=True,
            text=True,
            timeout=10,
        )
        if "Bad directive" not in probe.stdout + probe.stderr:
            return path
    pytest.skip("no redis-server here" + (" built with TLS" if tls else ""))


@contextlib.contextmanager
def server(args: list[str], port: int, *, ping: redis.Redis | None = None) -> Iterator[Path]:
    workdir = Path(tempfile.mkdtemp(prefix="sticky-srv-"))
    log = workdir / "server.log"
    proc = subprocess.Popen(
        [*args, "--dir", str(workdir), "--logfile", str(log), "--save", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = ping or redis.Redis(port=port, socket_connect_timeout=0.5)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.RedisError, OSError):
                if client.ping():
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                text = log.read_text() if log.exists() else ""
                raise RuntimeError(f"redis-server did not start: {args}\n{text[-2000:]}")
            time.sleep(0.05)
        yield workdir
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def make_certs(directory: Path) -> dict[str, str]:
    """A CA and a server certificate for 127.0.0.1, made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make test certificates")
    ca_key, ca, key, csr, cert = (
        str(directory / n) for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem")
    )

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        ca_key,
        "-out",
        ca,
        "-days",
        "1",
        "-subj",
        "/CN=sticky-test-ca",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        key,
        "-out",
        csr,
        "-subj",
        "/CN=127.0.0.1",
    )
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        ca,
        "-CAkey",
        ca_key,
        "-CAcreateserial",
        "-out",
        cert,
        "-days",
        "1",
        "-extfile",
        str(ext),
    )
    return {"ca": ca, "cert": cert, "key": key}


@contextlib.contextmanager
def tls_server(user: str, password: str) -> Iterator[tuple[int, str]]:
    """A TLS-only redis-server where only ``user`` (ACL) may log in: ``(port, ca path)``."""
    path = binary(tls=True)
    certs_dir = Path(tempfile.mkdtemp(prefix="sticky-tls-"))
    try:
        certs = make_certs(certs_dir)
        port = free_port()
        conf = certs_dir / "redis.conf"
        conf.write_text(f"user default off\nuser {user} on >{password} ~* &* +@all\n")
        args = [
            path,
            str(conf),
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            certs["cert"],
            "--tls-key-file",
            certs["key"],
            "--tls-ca-cert-file",
            certs["ca"],
            "--tls-auth-clients",
            "no",
        ]
        ping = redis.Redis(
            port=port,
            ssl=True,
            ssl_ca_certs=certs["ca"],
            username=user,
            password=password,
            socket_connect_timeout=0.5,
        )
        with server(args, port, ping=ping):
            yield port, certs["ca"]
    finally:
        shutil.rmtree(certs_dir, ignore_errors=True)


@contextlib.contextmanager
def sentinel_group(master_name: str) -> Iterator[tuple[int, int, int]]:
    """A master, a replica and one sentinel watching them: ``(master, replica, sentinel)``."""
    path = binary()
    master, replica, sentinel = free_port(), free_port(), free_port()
    base = [path, "--bind", "127.0.0.1", "--appendonly", "no", "--repl-diskless-sync-delay", "0"]
    with (
        server([*base, "--port", str(master)], master),
        server([*base, "--port", str(replica), "--replicaof", "127.0.0.1", str(master)], replica),
    ):
        conf_dir = Path(tempfile.mkdtemp(prefix="sticky-sentinel-"))
        conf = conf_dir / "sentinel.conf"
        conf.write_text(
            f"port {sentinel}\nbind 127.0.0.1\n"
            f"sentinel monitor {master_name} 127.0.0.1 {master} 1\n"
            f"sentinel down-after-milliseconds {master_name} 1000\n"
            f"sentinel failover-timeout {master_name} 5000\n"
        )
        try:
            with server([path, str(conf), "--sentinel"], sentinel):
                client = redis.Redis(port=sentinel, decode_responses=True)
                follower = redis.Redis(port=replica, decode_responses=True)
                deadline = time.monotonic() + 30
                while (
                    not client.sentinel_slaves(master_name)
                    or follower.info("replication")["master_link_status"] != "up"
                ):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the sentinel never saw the replica")
                    time.sleep(0.1)
                yield master, replica, sentinel
        finally:
            shutil.rmtree(conf_dir, ignore_errors=True)
