"""Benchmark: upload a 1 GiB dataset through the production server and print the figures.

    .venv/bin/python tests/bench/bench_upload.py [--size-mib 1024] [--mode tar|multipart|both]

Prints MB/s of the upload, the ratio to single-core ``hashlib.sha256`` speed measured in the
same run (target: at least 0.3), and the server's peak RSS (target: under 200 MiB). The
server is gunicorn with the shipped configuration on the embedded default (SQLite, blob
store with fsync on), on a loopback port, warmed by one 16 MiB upload; the client sends each
body with sendfile so that it costs the shared CPUs little.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import requests

CHUNK = 1 << 20
MIB = 1 << 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sha256_speed(size: int = 512 * MIB) -> float:
    """Single-core hashlib.sha256 over ``size`` bytes of the same kind of data, in MB/s."""
    block = os.urandom(CHUNK)
    digest = hashlib.sha256()
    start = time.perf_counter()
    for _ in range(size // CHUNK):
        digest.update(block)
    return size / (time.perf_counter() - start) / 1e6


def make_payload(directory: Path, size: int, salt: str) -> Path:
    """A file of ``size`` pseudo-random bytes, different for every ``salt``."""
    path = directory / f"payload-{salt}.bin"
    seed = hashlib.sha256(salt.encode()).digest()
    with open(path, "wb") as out:
        block = os.urandom(CHUNK)
        for index in range(size // CHUNK):
            # Cheap variation per block: different content, no measurable generation cost.
            out.write(block[:-40] + seed + index.to_bytes(8, "big"))
    return path


def write_tar(payload: Path, out: Path) -> Path:
    """A one-member tar archive of ``payload``, written in pieces (never all in memory)."""
    size = payload.stat().st_size
    info = tarfile.TarInfo("data/payload.bin")
    info.size = size
    with open(out, "wb") as archive, open(payload, "rb") as source:
        archive.write(info.tobuf(format=tarfile.PAX_FORMAT))
        while chunk := source.read(CHUNK):
            archive.write(chunk)
        archive.write(b"\0" * ((512 - size % 512) % 512) + b"\0" * 1024)
    return out


def write_multipart(payload: Path, out: Path, boundary: str) -> Path:
    """A multipart/form-data body with ``payload`` as one file part."""
    with open(out, "wb") as body, open(payload, "rb") as source:
        body.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
            f'filename="payload.bin"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
        )
        while chunk := source.read(CHUNK):
            body.write(chunk)
        body.write(f"\r\n--{boundary}--\r\n".encode())
    return out


def post_file(port: int, path: str, token: str, body: Path, content_type: str) -> tuple[int, bytes]:
    """POST ``body`` with a Content-Length, sent with sendfile so the client costs little CPU.

    The client shares the machine with the server; a Python-level copy loop in the client
    would be measured as server slowness.
    """
    size = body.stat().st_size
    with socket.create_connection(("127.0.0.1", port)) as sock, open(body, "rb") as source:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {size}\r\nConnection: close\r\n\r\n"
        )
        sock.sendall(head.encode())
        sock.sendfile(source)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    status = int(response.split(b" ", 2)[1])
    return status, response.partition(b"\r\n\r\n")[2]


def peak_rss_mib(pids: list[int]) -> float:
    peaks = []
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    return max(peaks, default=0.0)


def worker_pids(master: int) -> list[int]:
    children = Path(f"/proc/{master}/task/{master}/children")
    return (
        [master] + [int(p) for p in children.read_text().split()] if children.exists() else [master]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--mode", choices=["tar", "multipart", "both"], default="both")
    args = parser.parse_args()
    size = args.size_mib * MIB

    with tempfile.TemporaryDirectory(prefix="animus-bench-") as tmp:
        tmp_path = Path(tmp)
        env = {
            **os.environ,
            "ANIMUS_DATA_DIR": str(tmp_path / "data"),
            "ANIMUS_LOG_LEVEL": "WARNING",
            "ANIMUS_WORKERS": "1",
        }
        animus = [sys.executable, "-m", "appliance"]
        subprocess.run([*animus, "db", "upgrade"], env=env, check=True, capture_output=True)
        subprocess.run(
            [*animus, "admin", "create-user", "bench"], env=env, check=True, capture_output=True
        )
        token = subprocess.run(
            [*animus, "token", "create", "--user", "bench"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        port = free_port()
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                "python:appliance.gunicorn_conf",
                "--bind",
                f"127.0.0.1:{port}",
                "appliance.app:create_app()",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(100):
                try:
                    if requests.get(base + "/readyz", timeout=1).status_code == 200:
                        break
                except requests.ConnectionError:
                    time.sleep(0.1)
            session = requests.Session()
            session.headers["Authorization"] = f"Bearer {token}"
            pid = session.post(base + "/api/v1/projects", json={"name": "bench"}).json()["id"]
            print(f"payload: {args.size_mib} MiB of random blocks", flush=True)
            baseline = sha256_speed()
            print(f"single-core hashlib.sha256: {baseline:.0f} MB/s")
            modes = ["tar", "multipart"] if args.mode == "both" else [args.mode]
            boundary = "animus-bench-boundary-7c1e"
            # One small upload first: the figures are for a server in its steady state, not
            # for the worker's first request (imports, first allocations, cold page cache).
            warm = session.post(f"{base}/api/v1/projects/{pid}/datasets", json={"name": "warm"})
            warm_body = write_tar(make_payload(tmp_path, 16 * MIB, "warm"), tmp_path / "warm.tar")
            post_file(
                port,
                f"/api/v1/projects/{pid}/datasets/{warm.json()['id']}/versions",
                token,
                warm_body,
                "application/x-tar",
            )
            for mode in modes:
                payload = make_payload(tmp_path, size, mode)
                if mode == "tar":
                    body, content_type = write_tar(payload, tmp_path / "body"), "application/x-tar"
                else:
                    body = write_multipart(payload, tmp_path / "body", boundary)
                    content_type = f"multipart/form-data; boundary={boundary}"
                payload.unlink()
                dataset = session.post(
                    f"{base}/api/v1/projects/{pid}/datasets", json={"name": f"ds-{mode}"}
                ).json()["id"]
                start = time.perf_counter()
                status, answer = post_file(
                    port,
                    f"/api/v1/projects/{pid}/datasets/{dataset}/versions",
                    token,
                    body,
                    content_type,
                )
                elapsed = time.perf_counter() - start
                if status != 201:
                    raise SystemExit(f"upload ({mode}) failed: {status} {answer[:300]!r}")
                speed = size / elapsed / 1e6
                print(
                    f"upload ({mode}): {speed:.0f} MB/s in {elapsed:.2f} s; "
                    f"ratio to sha256: {speed / baseline:.2f} (target >= 0.30)"
                )
            rss = peak_rss_mib(worker_pids(server.pid))
            print(f"server peak RSS: {rss:.0f} MiB (target < 200 MiB)")
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
