"""Walk a project on an installed appliance the way an ML user does, through its API only.

Run with the installed release's Python (inside the network namespace of the installation):

    python walk_project.py URL TOKEN REPO_URL COMMIT IMAGE_DIGEST
    python walk_project.py --replay URL TOKEN PROJECT RUN
    python walk_project.py --add-version URL TOKEN PROJECT
    python walk_project.py --check-version URL TOKEN PROJECT VERSION SHA256

Creates a project, uploads a dataset version, registers the code and an environment lock on
the runner image, runs the job in a runc container, checks its logs, metrics and artifact,
replays it and prints one JSON line: {"project", "run", "replay", "reproduced", "artifact"}.
With --replay: checks the artifact of an existing RUN against its digest and replays it
(after a restore, say). --add-version uploads a new dataset version and prints its id and
its file's SHA-256; --check-version downloads that file and compares (data made under one
release, read after a rollback). Exits non-zero with the reason on the first thing that does
not work.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import requests

from appliance.demo import tar_of


class Api:
    """The API as TOKEN's user; every call must answer with the status expected."""

    def __init__(self, url: str, token: str):
        self.url = url
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    def __call__(self, method: str, path: str, expect: int = 200, **kwargs) -> dict:
        response = self.session.request(method, self.url + path, timeout=60, **kwargs)
        if response.status_code != expect:
            sys.exit(f"{method} {path}: {response.status_code} {response.text[:500]}")
        return response.json()

    def content(self, path: str) -> bytes:
        return self.session.get(self.url + path, timeout=60).content

    def finish(self, pid: str, run_id: str) -> dict:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            state = self("GET", f"/api/v1/projects/{pid}/runs/{run_id}")
            if state["state"] in ("succeeded", "failed", "canceled"):
                return state
            time.sleep(0.3)
        sys.exit(f"run {run_id} did not finish: {state}")


def replay(call: Api, pid: str, run_id: str) -> dict:
    """Check RUN's artifact against its listed digest, replay the run, return the verdict."""
    base = f"/api/v1/projects/{pid}/runs/{run_id}"
    content = call.content(base + "/artifacts/model.json")
    listed = {a["path"]: a["sha256"] for a in call("GET", base + "/artifacts")}
    if listed.get("model.json") != hashlib.sha256(content).hexdigest():
        sys.exit(f"artifact digest mismatch: {listed}")
    again = call("POST", base + "/replay", 201)
    if call.finish(pid, again["id"])["state"] != "succeeded":
        sys.exit("the replay did not succeed")
    verdict = call("GET", f"/api/v1/projects/{pid}/runs/{again['id']}")["reproducibility"]
    return {
        "project": pid,
        "run": run_id,
        "replay": again["id"],
        "reproduced": verdict["reproduced"],
        "artifact": json.loads(content),
    }


ADDED = b"c,d\n5,6\n7,8\n"


def add_version(call: Api, pid: str) -> dict:
    """A new dataset with one version holding ``added.csv``: its id and the file's SHA-256."""
    dataset = call("POST", f"/api/v1/projects/{pid}/datasets", 201, json={"name": "added"})
    version = call(
        "POST",
        f"/api/v1/projects/{pid}/datasets/{dataset['id']}/versions",
        201,
        data=tar_of({"added.csv": ADDED}),
        headers={"Content-Type": "application/x-tar"},
    )
    return {"version": version["id"], "sha256": hashlib.sha256(ADDED).hexdigest()}


def check_version(call: Api, pid: str, version_id: str, sha256: str) -> dict:
    """Download VERSION's ``added.csv`` and compare it with SHA256 and with the listing."""
    path = f"/api/v1/projects/{pid}/dataset-versions/{version_id}"
    content = call.content(path + "/files/added.csv")
    if hashlib.sha256(content).hexdigest() != sha256:
        sys.exit(f"added.csv of {version_id} does not match {sha256}")
    listed = {f["path"]: f["sha256"] for f in call("GET", path)["files"]}
    if listed != {"added.csv": sha256}:
        sys.exit(f"version {version_id} lists {listed}")
    return {"version": version_id, "sha256": sha256}


def main(url: str, token: str, repo_url: str, commit: str, digest: str) -> dict:
    call = Api(url, token)
    pid = call("POST", "/api/v1/projects", 201, json={"name": "walk"})["id"]
    dataset = call("POST", f"/api/v1/projects/{pid}/datasets", 201, json={"name": "rows"})
    version = call(
        "POST",
        f"/api/v1/projects/{pid}/datasets/{dataset['id']}/versions",
        201,
        data=tar_of({"rows.csv": b"a,b\n1,2\n3,4\n"}),
        headers={"Content-Type": "application/x-tar"},
    )
    code = call(
        "POST",
        f"/api/v1/projects/{pid}/code-refs",
        201,
        json={"repo_url": repo_url, "commit_sha": commit},
    )
    environment = call(
        "POST",
        f"/api/v1/projects/{pid}/environments",
        201,
        json={"name": "runner", "base_image": "runner", "packages": []},
    )
    lock = call(
        "POST",
        f"/api/v1/projects/{pid}/environment-locks",
        201,
        json={"environment_id": environment["id"], "image_digest": digest, "packages": []},
    )
    spec = {
        "code_ref_id": code["id"],
        "environment_lock_id": lock["id"],
        "inputs": [{"name": "train", "dataset_version_id": version["id"]}],
        "production": True,
        "command": ["python3", "job.py"],
    }
    run = call("POST", f"/api/v1/projects/{pid}/runs", 201, json=spec)

    done = call.finish(pid, run["id"])
    if done["state"] != "succeeded":
        sys.exit(f"run {run['id']} {done['state']}: {done.get('reason')}")
    metrics = call("GET", f"/api/v1/projects/{pid}/runs/{run['id']}/metrics")["metrics"]
    if [m["value"] for m in metrics.get("loss", [])] != [1.0, 0.5]:
        sys.exit(f"unexpected metrics {metrics}")
    return replay(call, pid, run["id"])


JOB = """import json, os
import animus_run
rows = open(os.path.join(os.environ["ANIMUS_INPUTS_DIR"], "train", "rows.csv")).read()
for step in range(2):
    animus_run.log_metric("loss", 1.0 / (step + 1), step=step)
out = os.path.join(os.environ["ANIMUS_OUTPUT_DIR"], "model.json")
open(out, "w").write(json.dumps({"rows": rows.count(chr(10))}))
print("done", flush=True)
"""

if __name__ == "__main__":
    if sys.argv[1:2] == ["--replay"]:
        url, token, project, run_id = sys.argv[2:6]
        print(json.dumps(replay(Api(url, token), project, run_id)), flush=True)
    elif sys.argv[1:2] == ["--add-version"]:
        url, token, project = sys.argv[2:5]
        print(json.dumps(add_version(Api(url, token), project)), flush=True)
    elif sys.argv[1:2] == ["--check-version"]:
        url, token, project, version_id, sha256 = sys.argv[2:7]
        print(json.dumps(check_version(Api(url, token), project, version_id, sha256)), flush=True)
    else:
        print(json.dumps(main(*sys.argv[1:6])), flush=True)
