"""The control plane under gunicorn with the shipped configuration (the production server).

Uploads take a zero-copy path on gunicorn (``appliance.api.bodies``); these tests drive it
with known-length bodies, chunked bodies, and several requests on one kept-alive connection.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import time

import pytest
import requests

from tests.conftest import free_port


def tar_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def gunicorn(tmp_path):
    env = {
        **os.environ,
        "ANIMUS_DATA_DIR": str(tmp_path / "data"),
        "ANIMUS_LOG_LEVEL": "WARNING",
        "ANIMUS_WORKERS": "2",
    }
    animus = [sys.executable, "-m", "appliance"]
    subprocess.run([*animus, "db", "upgrade"], env=env, check=True, capture_output=True)
    subprocess.run(
        [*animus, "admin", "create-user", "gina"], env=env, check=True, capture_output=True
    )
    token = subprocess.run(
        [*animus, "token", "create", "--user", "gina"],
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
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(150):
        try:
            if requests.get(base + "/readyz", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(0.1)
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    yield base, session
    session.close()
    server.terminate()
    server.wait(30)


def test_uploads_under_gunicorn_keep_the_connection_consistent(gunicorn):
    base, api = gunicorn
    pid = api.post(base + "/api/v1/projects", json={"name": "g"}).json()["id"]
    ds = api.post(f"{base}/api/v1/projects/{pid}/datasets", json={"name": "d"}).json()["id"]
    url = f"{base}/api/v1/projects/{pid}/datasets/{ds}/versions"
    big = os.urandom(5 << 20)
    small = b"a,b\n1,2\n"
    # Known length (the socket path), then chunked (gunicorn's own reader), then multipart,
    # all on the same kept-alive connection, each followed by an ordinary JSON request.
    bodies = [
        {
            "data": tar_of({"big.bin": big, "small.csv": small}),
            "headers": {"Content-Type": "application/x-tar"},
        },
        {
            "data": iter([tar_of({"big.bin": big})]),
            "headers": {"Content-Type": "application/x-tar"},
        },
        {"files": [("files", ("small.csv", small)), ("files", ("big.bin", big))]},
    ]
    for kwargs in bodies:
        response = api.post(url, **kwargs)
        assert response.status_code == 201, response.text
        files = {f["path"]: f["sha256"] for f in response.json()["files"]}
        assert files["big.bin"] == hashlib.sha256(big).hexdigest()
        assert api.get(f"{base}/api/v1/projects/{pid}").status_code == 200
    version = response.json()["id"]
    download = api.get(f"{base}/api/v1/projects/{pid}/dataset-versions/{version}/files/big.bin")
    assert download.content == big


def test_refused_upload_under_gunicorn_leaves_the_server_healthy(gunicorn):
    base, api = gunicorn
    pid = api.post(base + "/api/v1/projects", json={"name": "g"}).json()["id"]
    ds = api.post(f"{base}/api/v1/projects/{pid}/datasets", json={"name": "d"}).json()["id"]
    body = tar_of({"ok.txt": b"x" * (2 << 20)})[: 1 << 20]  # truncated inside the member
    refused = api.post(
        f"{base}/api/v1/projects/{pid}/datasets/{ds}/versions",
        data=body,
        headers={"Content-Type": "application/x-tar"},
    )
    assert (refused.status_code, refused.json()["error"]) == (422, "malformed_archive")
    assert api.get(f"{base}/api/v1/projects/{pid}").status_code == 200
