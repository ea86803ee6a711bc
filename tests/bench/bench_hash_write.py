"""How fast uploads reach the blob store, next to plain hashlib.sha256 on the same machine.

Run: ``python tests/bench/bench_hash_write.py [--gib 1] [--rounds 3] [--fsync]``

Every case moves the same number of bytes (1 GiB by default) and reports the median of
``--rounds`` runs in MB/s and as a ratio to ``hashlib.sha256`` measured in the same run,
since absolute speeds on a shared machine drift (PLATFORM-NOTES "Load and timing").
Sources on a socket are fed by a separate process, like a client would.

Cases:
  sha256 alone            hashlib.sha256().update() over 1 MiB slices of memory
  write alone             os.write() of 1 MiB blocks into a file next to the store: the
                          ceiling the disk / page cache puts on everything below
  add_stream memory       StagedBlobs.add_stream(BytesIO.read): readinto into reused buffers
  add_stream read-only    add_stream on a callable without readinto (fresh bytes per read)
  add_stream socket       add_stream on a socket file (what a WSGI server hands over)
  tar socket              read_tar_stream: one member of the whole size, plain tar
  multipart socket        read_multipart_stream: one file part of the whole size
  http add_stream         a WSGI app under werkzeug's server; request.stream -> add_stream
  http tar                the same app, body is a plain tar -> read_tar_stream
  http multipart          the same app, multipart/form-data -> read_multipart_stream
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import io
import multiprocessing
import os
import shutil
import socket
import statistics
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from appliance.storage.blobs import CHUNK_BYTES, BlobStore
from appliance.storage.uploads import (
    UploadLimits,
    read_multipart_stream,
    read_tar_stream,
)

BOUNDARY = "bench-boundary-3f9c2a"
_fork = multiprocessing.get_context("fork")


def body_parts(kind: str, size: int, block: bytes) -> tuple[bytes, bytes, int]:
    """Prefix, suffix and total length of a body carrying ``size`` payload bytes."""
    if kind == "tar":
        info = tarfile.TarInfo("payload.bin")
        info.size = size
        prefix = info.tobuf(tarfile.PAX_FORMAT)
        suffix = bytes(-size % tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE)
    elif kind == "multipart":
        prefix = (
            f"--{BOUNDARY}\r\n"
            'Content-Disposition: form-data; name="file"; filename="payload.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        suffix = f"\r\n--{BOUNDARY}--\r\n".encode()
    else:
        prefix = suffix = b""
    return prefix, suffix, len(prefix) + size + len(suffix)


def send_body(sock: socket.socket, prefix: bytes, suffix: bytes, size: int, block: bytes):
    sock.sendall(prefix)
    sent = 0
    view = memoryview(block)
    while sent < size:
        count = min(len(block), size - sent)
        sock.sendall(view[:count])
        sent += count
    sock.sendall(suffix)


def socket_sender(port: int, kind: str, size: int, block: bytes) -> None:
    prefix, suffix, _ = body_parts(kind, size, block)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        send_body(sock, prefix, suffix, size, block)


def http_sender(port: int, kind: str, size: int, block: bytes) -> None:
    prefix, suffix, total = body_parts(kind, size, block)
    connection = http.client.HTTPConnection("127.0.0.1", port)
    content_type = {
        "tar": "application/x-tar",
        "multipart": f"multipart/form-data; boundary={BOUNDARY}",
    }.get(kind, "application/octet-stream")
    connection.putrequest("POST", f"/{kind}")
    connection.putheader("Content-Type", content_type)
    connection.putheader("Content-Length", str(total))
    connection.endheaders()
    send_body(connection.sock, prefix, suffix, size, block)
    response = connection.getresponse()
    assert response.status == 200, response.read()
    response.read()


def receive(kind: str, stream, content_type: str, store: BlobStore, size: int, fsync: bool):
    limits = UploadLimits(max_total_bytes=size + 1)
    with store.stage() as staged:
        if kind == "tar":
            files = read_tar_stream(stream, staged, limits)
        elif kind == "multipart":
            files = read_multipart_stream(stream, content_type, staged, limits)
        else:
            staged.add_stream(stream.read, max_bytes=size)
            files = None
        if fsync:
            staged.promote()
    if files is not None:
        assert files[0].size == size, files
    if fsync:
        shutil.rmtree(store.blob_dir)
        store.blob_dir.mkdir()


def over_socket(kind: str, store: BlobStore, size: int, block: bytes, fsync: bool) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        sender = _fork.Process(target=socket_sender, args=(port, kind, size, block))
        sender.start()
        connection, _ = server.accept()
    with connection, connection.makefile("rb") as stream:
        content_type = f"multipart/form-data; boundary={BOUNDARY}"
        receive(kind, stream, content_type, store, size, fsync)
    sender.join()
    assert sender.exitcode == 0


class QuietHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs) -> None:
        pass


class UploadApp:
    """A WSGI app standing in for the API: body -> blob staging, nothing else."""

    def __init__(self, store: BlobStore, size: int, fsync: bool):
        self.store, self.size, self.fsync = store, size, fsync

    def __call__(self, environ, start_response):
        request = Request(environ)
        kind = request.path.strip("/")
        receive(kind, request.stream, request.content_type, self.store, self.size, self.fsync)
        return Response("ok")(environ, start_response)


def over_http(server, kind: str, size: int, block: bytes) -> None:
    sender = _fork.Process(target=http_sender, args=(server.port, kind, size, block))
    sender.start()
    sender.join()
    assert sender.exitcode == 0


def sha256_alone(size: int, block: bytes) -> None:
    hasher = hashlib.sha256()
    view = memoryview(block)
    for _ in range(size // len(block)):
        hasher.update(view)


def write_alone(directory: Path, size: int, block: bytes) -> None:
    path = directory / "write-alone.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(size // len(block)):
            os.write(fd, block)
    finally:
        os.close(fd)
        path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fsync", action="store_true", help="also promote with fsync")
    parser.add_argument("--dir", default=None, help="where the blob store goes")
    args = parser.parse_args()
    size = int(args.gib * (1 << 30)) // CHUNK_BYTES * CHUNK_BYTES
    block = os.urandom(CHUNK_BYTES)
    root = Path(tempfile.mkdtemp(prefix="bench-blobs-", dir=args.dir))
    store = BlobStore(root, fsync=args.fsync)
    server = make_server(
        "127.0.0.1",
        0,
        UploadApp(store, size, args.fsync),
        threaded=True,
        request_handler=QuietHandler,
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    memory = block * (size // CHUNK_BYTES)

    class ReadOnly:
        def __init__(self):
            self._stream = io.BytesIO(memory)

        def read(self, count: int) -> bytes:  # no readinto on purpose
            return self._stream.read(count)

    cases: dict[str, Callable[[], None]] = {
        "sha256 alone": lambda: sha256_alone(size, block),
        "write alone": lambda: write_alone(store.tmp_dir, size, block),
        "add_stream memory": lambda: receive(
            "raw", io.BytesIO(memory), "", store, size, args.fsync
        ),
        "add_stream read-only": lambda: receive("raw", ReadOnly(), "", store, size, args.fsync),
        "add_stream socket": lambda: over_socket("raw", store, size, block, args.fsync),
        "tar socket": lambda: over_socket("tar", store, size, block, args.fsync),
        "multipart socket": lambda: over_socket("multipart", store, size, block, args.fsync),
        "http add_stream": lambda: over_http(server, "raw", size, block),
        "http tar": lambda: over_http(server, "tar", size, block),
        "http multipart": lambda: over_http(server, "multipart", size, block),
    }
    speeds: dict[str, list[float]] = {name: [] for name in cases}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in cases}
    try:
        for round_number in range(args.rounds):
            names = list(cases) if round_number % 2 == 0 else list(reversed(cases))
            for name in names:
                started, cpu_started = time.perf_counter(), time.process_time()
                cases[name]()
                speeds[name].append(size / 1e6 / (time.perf_counter() - started))
                cpu_seconds[name].append(time.process_time() - cpu_started)
    finally:
        server.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    baseline = statistics.median(speeds["sha256 alone"])
    print(
        f"{size / (1 << 30):.2f} GiB, {args.rounds} rounds, fsync={args.fsync}, "
        f"{os.cpu_count()} CPUs, store under {root.parent}"
    )
    # CPU seconds of this process (the sender runs in another) per GiB: less sensitive to
    # other load on the machine than wall-clock speed.
    print(f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'case':24s} {'median MB/s':>11s} {'x sha256':>9s} {'CPU s/GiB':>10s}   all runs")
    for name, values in speeds.items():
        median = statistics.median(values)
        cpu = statistics.median(cpu_seconds[name]) * (1 << 30) / size
        runs = " ".join(f"{value:.0f}" for value in values)
        print(f"{name:24s} {median:11.0f} {median / baseline:9.2f} {cpu:10.2f}   {runs}")


if __name__ == "__main__":
    main()
