"""Dataset versions: uploads (multipart and tar), immutability, lineage, download, atomicity."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest

from appliance.domain.records import DatasetFile, DatasetVersion


def make_tar(files: dict[str, bytes], *, extra: list[tarfile.TarInfo] = ()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for info in extra:
            archive.addfile(info)
    return buffer.getvalue()


@pytest.fixture
def dataset(alice, project) -> dict:
    response = alice.api.post(f"/api/v1/projects/{project['id']}/datasets", json={"name": "iris"})
    assert response.status_code == 201, response.text
    return response.json()


def versions_url(project, dataset) -> str:
    return f"/api/v1/projects/{project['id']}/datasets/{dataset['id']}/versions"


def blob_files(config) -> list:
    root = config.blob_dir / "sha256"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_multipart_upload_creates_an_immutable_version(alice, project, dataset, config):
    content = {"train.csv": b"a,b\n1,2\n", "test.csv": b"a,b\n3,4\n"}
    response = alice.api.post(
        versions_url(project, dataset),
        files=[("files", (name, data)) for name, data in content.items()],
    )
    assert response.status_code == 201, response.text
    version = response.json()
    assert version["number"] == 1 and version["file_count"] == 2 and version["total_size"] == 16
    assert version["files"] == [
        {"path": p, "sha256": hashlib.sha256(content[p]).hexdigest(), "size": len(content[p])}
        for p in sorted(content)
    ]
    test_sha = hashlib.sha256(content["test.csv"]).hexdigest()
    train_sha = hashlib.sha256(content["train.csv"]).hexdigest()
    manifest = (
        f'[{{"path":"test.csv","sha256":"{test_sha}","size":8}},'
        f'{{"path":"train.csv","sha256":"{train_sha}","size":8}}]'
    )
    assert version["digest"] == "sha256:" + hashlib.sha256(manifest.encode()).hexdigest()
    pid = project["id"]
    fetched = alice.api.get(f"/api/v1/projects/{pid}/dataset-versions/{version['id']}").json()
    assert fetched == version
    for verb in ("patch", "delete"):
        refused = getattr(alice.api, verb)(
            f"/api/v1/projects/{pid}/dataset-versions/{version['id']}"
        )
        assert refused.status_code == 409 and refused.json()["error"] == "immutable"


def test_tar_upload_with_lineage_and_download(alice, project, dataset, config):
    first = alice.api.post(
        versions_url(project, dataset),
        data=make_tar({"data/x.bin": b"\x00" * 1000}),
        headers={"Content-Type": "application/x-tar"},
    ).json()
    second = alice.api.post(
        versions_url(project, dataset),
        params={"parent_id": first["id"], "message": "add labels"},
        data=make_tar({"data/x.bin": b"\x00" * 1000, "labels/y.txt": b"cat\n"}),
        headers={"Content-Type": "application/x-tar"},
    )
    assert second.status_code == 201, second.text
    second = second.json()
    assert (second["number"], second["parent_id"], second["message"]) == (
        2,
        first["id"],
        "add labels",
    )
    assert len(blob_files(config)) == 2  # the shared file is stored once
    pid = project["id"]
    download = alice.api.get(
        f"/api/v1/projects/{pid}/dataset-versions/{second['id']}/files/labels/y.txt"
    )
    assert download.status_code == 200 and download.content == b"cat\n"
    assert download.headers["ETag"].strip('"') == hashlib.sha256(b"cat\n").hexdigest()
    assert download.headers["Repr-Digest"].startswith("sha-256=:")
    missing = alice.api.get(f"/api/v1/projects/{pid}/dataset-versions/{second['id']}/files/nope")
    assert missing.status_code == 404
    listed = alice.api.get(versions_url(project, dataset)).json()["items"]
    assert [v["number"] for v in listed] == [1, 2]


UNSAFE = {
    "symlink": (tarfile.SYMTYPE, "link", "/etc/passwd"),
    "hardlink": (tarfile.LNKTYPE, "hard", "ok.txt"),
    "absolute": (tarfile.REGTYPE, "/etc/evil", ""),
    "dotdot": (tarfile.REGTYPE, "../../evil", ""),
    "device": (tarfile.CHRTYPE, "dev", ""),
    "fifo": (tarfile.FIFOTYPE, "pipe", ""),
}


@pytest.mark.parametrize("kind", sorted(UNSAFE))
def test_unsafe_archives_are_refused_without_leftovers(alice, project, dataset, config, kind):
    type_, name, target = UNSAFE[kind]
    info = tarfile.TarInfo(name)
    info.type = type_
    info.linkname = target
    body = make_tar({"ok.txt": b"fine"}, extra=[info])
    response = alice.api.post(
        versions_url(project, dataset), data=body, headers={"Content-Type": "application/x-tar"}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "unsafe_archive_member"
    assert name.lstrip("/") in response.json()["message"] or name in response.json()["message"]
    assert DatasetVersion.select().count() == 0 and DatasetFile.select().count() == 0
    assert blob_files(config) == []
    assert list((config.blob_dir / "tmp").iterdir()) == []


def test_bad_uploads_get_specific_errors(alice, project, dataset, config):
    url = versions_url(project, dataset)
    cases = [
        (
            {"data": b"not a tar at all" * 100, "headers": {"Content-Type": "application/x-tar"}},
            422,
            "malformed_archive",
        ),
        (
            {"data": make_tar({}), "headers": {"Content-Type": "application/x-tar"}},
            422,
            "empty_upload",
        ),
        (
            {"data": b"abc", "headers": {"Content-Type": "text/plain"}},
            415,
            "unsupported_media_type",
        ),
        (
            {
                "data": b"--x\r\ngarbage",
                "headers": {"Content-Type": "multipart/form-data; boundary=x"},
            },
            400,
            "malformed_multipart",
        ),
        (
            {
                "data": make_tar({"a": b"1"}),
                "params": {"parent_id": "dsv_nope"},
                "headers": {"Content-Type": "application/x-tar"},
            },
            422,
            "validation_failed",
        ),
    ]
    for kwargs, status, code in cases:
        response = alice.api.post(url, **kwargs)
        assert (response.status_code, response.json()["error"]) == (status, code), response.text
    assert DatasetVersion.select().count() == 0
    assert blob_files(config) == []


def test_truncated_upload_leaves_nothing(alice, project, dataset, config):
    whole = make_tar({"big.bin": b"\x01" * 200_000})
    response = alice.api.post(
        versions_url(project, dataset),
        data=whole[:100_000],
        headers={"Content-Type": "application/x-tar"},
    )
    assert response.status_code == 422 and response.json()["error"] == "malformed_archive"
    assert DatasetVersion.select().count() == 0 and blob_files(config) == []


def test_cross_project_parent_is_refused(alice, project, dataset):
    other = alice.api.post("/api/v1/projects", json={"name": "elsewhere"}).json()
    other_ds = alice.api.post(f"/api/v1/projects/{other['id']}/datasets", json={"name": "d"}).json()
    foreign = alice.api.post(
        f"/api/v1/projects/{other['id']}/datasets/{other_ds['id']}/versions",
        data=make_tar({"a": b"1"}),
        headers={"Content-Type": "application/x-tar"},
    ).json()
    response = alice.api.post(
        versions_url(project, dataset),
        params={"parent_id": foreign["id"]},
        data=make_tar({"a": b"1"}),
        headers={"Content-Type": "application/x-tar"},
    )
    assert response.status_code == 422 and response.json()["error"] == "cross_project_reference"
    # The same object through the wrong project's URL does not exist.
    assert (
        alice.api.get(
            f"/api/v1/projects/{project['id']}/dataset-versions/{foreign['id']}"
        ).status_code
        == 404
    )


def test_upload_beyond_the_size_limit_is_refused(config, alice, project, dataset):
    import dataclasses

    from appliance.app import create_app
    from tests.conftest import serve_app

    small = create_app(dataclasses.replace(config, max_upload_bytes=50_000))
    with serve_app(small) as live:
        client = live.client(alice.token)
        url = versions_url(project, dataset)
        declared = client.post(
            url, data=make_tar({"a": b"1" * 60_000}), headers={"Content-Type": "application/x-tar"}
        )
        assert (declared.status_code, declared.json()["error"]) == (413, "upload_too_large")

        def chunks():  # no Content-Length: the limit must hold while streaming
            yield make_tar({"a": b"1" * 60_000})

        streamed = client.post(url, data=chunks(), headers={"Content-Type": "application/x-tar"})
        assert (streamed.status_code, streamed.json()["error"]) == (413, "upload_too_large")
    assert DatasetVersion.select().count() == 0 and blob_files(config) == []
