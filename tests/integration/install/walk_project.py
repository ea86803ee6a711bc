"""Walk a project on an installed appliance the way an ML user does, through its API only.

Run with the installed release's Python (inside the network namespace of the installation):

    python walk_project.py URL TOKEN REPO_URL COMMIT IMAGE_DIGEST

Creates a project, uploads a dataset version, registers the code and an environment lock on
the runner image, runs the job in a runc container, checks its logs, metrics and artifact,
replays it and prints one JSON line: {"project", "run", "replay", "reproduced", "artifact"}.
Exits non-zero with the reason on the first thing that does not work.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import requests

from appliance.demo import tar_of


def main(url: str, token: str, repo_url: str, commit: str, digest: str) -> dict:
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {token}"

    def call(method: str, path: str, expect: int = 200, **kwargs) -> dict:
        response = api.request(method, url + path, timeout=60, **kwargs)
        if response.status_code != expect:
            sys.exit(f"{method} {path}: {response.status_code} {response.text[:500]}")
        return response.json()

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

    def finish(run_id: str) -> dict:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            state = call("GET", f"/api/v1/projects/{pid}/runs/{run_id}")
            if state["state"] in ("succeeded", "failed", "canceled"):
                return state
            time.sleep(0.3)
        sys.exit(f"run {run_id} did not finish: {state}")

    done = finish(run["id"])
    if done["state"] != "succeeded":
        sys.exit(f"run {run['id']} {done['state']}: {done.get('reason')}")
    base = f"/api/v1/projects/{pid}/runs/{run['id']}"
    metrics = call("GET", base + "/metrics")["metrics"]
    if [m["value"] for m in metrics.get("loss", [])] != [1.0, 0.5]:
        sys.exit(f"unexpected metrics {metrics}")
    content = api.get(url + base + "/artifacts/model.json", timeout=60).content
    listed = {a["path"]: a["sha256"] for a in call("GET", base + "/artifacts")}
    if listed.get("model.json") != hashlib.sha256(content).hexdigest():
        sys.exit(f"artifact digest mismatch: {listed}")
    replay = call("POST", base + "/replay", 201)
    if finish(replay["id"])["state"] != "succeeded":
        sys.exit("the replay did not succeed")
    verdict = call("GET", f"/api/v1/projects/{pid}/runs/{replay['id']}")["reproducibility"]
    return {
        "project": pid,
        "run": run["id"],
        "replay": replay["id"],
        "reproduced": verdict["reproduced"],
        "artifact": json.loads(content),
    }


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
    print(json.dumps(main(*sys.argv[1:6])), flush=True)
