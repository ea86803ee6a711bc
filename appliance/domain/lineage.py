"""Lineage: the graph of what an object was made from and what was made from it.

Nodes are DatasetVersions, CodeRefs, EnvironmentLocks, Runs, Artifacts, Models,
ModelVersions and export packages; edges point from input to output:

    dataset_version ─derived_from→ dataset_version      (the version's parent)
    dataset_version ─input→ run,  code_ref ─code→ run,  environment_lock ─environment→ run
    run ─rerun|retry|replay→ run                        (the run's source)
    run ─output→ artifact ─registered_as→ model_version ─exported_as→ model_export
    model ─version→ model_version

From the object asked about, the walk goes upstream through inputs only and downstream
through outputs only, so the answer is the object's ancestry and progeny, not everything
that shares a dataset with it. Every object visited is in the project asked about.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

from appliance.domain.records import (
    Artifact,
    CodeRef,
    Dataset,
    DatasetVersion,
    EnvironmentLock,
    Model,
    ModelExport,
    ModelVersion,
    Project,
    Run,
)
from appliance.errors import NotFound

#: Most nodes one answer holds; a larger graph is cut off and says so.
MAX_NODES = 1000

_MODELS = {
    "dataset_version": DatasetVersion,
    "code_ref": CodeRef,
    "environment_lock": EnvironmentLock,
    "run": Run,
    "artifact": Artifact,
    "model": Model,
    "model_version": ModelVersion,
    "model_export": ModelExport,
}
NODE_TYPES = tuple(sorted(_MODELS))
_TYPE_BY_PREFIX = {
    "dsv": "dataset_version",
    "code": "code_ref",
    "lock": "environment_lock",
    "run": "run",
    "art": "artifact",
    "mdl": "model",
    "mv": "model_version",
    "mex": "model_export",
}

Node = tuple[str, object]  # (type, record)
Edge = tuple[str, str, str]  # (from id, to id, kind)


def _label(kind: str, record) -> str:
    if kind == "dataset_version":
        dataset = Dataset.get_or_none(Dataset.id == record.dataset_id)
        return f"{dataset.name if dataset else record.dataset_id} v{record.number}"
    if kind == "code_ref":
        return f"{record.repo_url}@{record.commit_sha[:12] if record.commit_sha else record.ref}"
    if kind == "environment_lock":
        return record.image_digest[:19]
    if kind == "run":
        return f"run {record.state}: {' '.join(record.command)[:60]}"
    if kind == "artifact":
        return record.path
    if kind == "model":
        return record.name
    if kind == "model_version":
        model = Model.get_or_none(Model.id == record.model_id)
        return f"{model.name if model else record.model_id} v{record.number} ({record.stage})"
    return f"export {record.sha256[:12]}"


def _one(kind: str, object_id: str | None, project_id: str) -> Iterator[Node]:
    if object_id:
        model = _MODELS[kind]
        found = model.get_or_none((model.id == object_id) & (model.project_id == project_id))
        if found is not None:
            yield kind, found


def _upstream(kind: str, record, _limit: int) -> Iterator[tuple[Node, str]]:
    pid = record.project_id
    if kind == "dataset_version":
        for node in _one("dataset_version", record.parent_id, pid):
            yield node, "derived_from"
    elif kind == "run":
        for item in record.inputs:
            for node in _one("dataset_version", item["dataset_version_id"], pid):
                yield node, "input"
        for node in _one("code_ref", record.code_ref_id, pid):
            yield node, "code"
        for node in _one("environment_lock", record.environment_lock_id, pid):
            yield node, "environment"
        for node in _one("run", record.source_run_id, pid):
            yield node, record.source_kind or "source"
    elif kind == "artifact":
        for node in _one("run", record.run_id, pid):
            yield node, "output"
    elif kind == "model_version":
        for node in _one("artifact", record.artifact_id, pid):
            yield node, "registered_as"
        for node in _one("model", record.model_id, pid):
            yield node, "version"
    elif kind == "model_export":
        for node in _one("model_version", record.model_version_id, pid):
            yield node, "exported_as"


def _downstream(kind: str, record, limit: int) -> Iterator[tuple[Node, str]]:
    """What was made from ``record``: at most ``limit`` of each kind (the walk's node budget
    plus one, so reading more could not change the answer, only cost time)."""
    pid = record.project_id
    in_project = Run.project_id == pid
    if kind == "dataset_version":
        for child in (
            DatasetVersion.select()
            .where((DatasetVersion.parent_id == record.id) & (DatasetVersion.project_id == pid))
            .limit(limit)
        ):
            yield ("dataset_version", child), "derived_from"
        # inputs are JSON text: narrow with LIKE, then check exactly
        for run in Run.select().where(in_project & Run.inputs.contains(record.id)).limit(limit):
            if any(i["dataset_version_id"] == record.id for i in run.inputs):
                yield ("run", run), "input"
    elif kind == "code_ref":
        for run in Run.select().where(in_project & (Run.code_ref_id == record.id)).limit(limit):
            yield ("run", run), "code"
    elif kind == "environment_lock":
        for run in (
            Run.select().where(in_project & (Run.environment_lock_id == record.id)).limit(limit)
        ):
            yield ("run", run), "environment"
    elif kind == "run":
        for artifact in (
            Artifact.select()
            .where((Artifact.run_id == record.id) & (Artifact.project_id == pid))
            .limit(limit)
        ):
            yield ("artifact", artifact), "output"
        for run in Run.select().where(in_project & (Run.source_run_id == record.id)).limit(limit):
            yield ("run", run), run.source_kind or "source"
    elif kind == "artifact":
        for version in (
            ModelVersion.select()
            .where((ModelVersion.artifact_id == record.id) & (ModelVersion.project_id == pid))
            .limit(limit)
        ):
            yield ("model_version", version), "registered_as"
    elif kind == "model":
        for version in (
            ModelVersion.select()
            .where((ModelVersion.model_id == record.id) & (ModelVersion.project_id == pid))
            .limit(limit)
        ):
            yield ("model_version", version), "version"
    elif kind == "model_version":
        for export in (
            ModelExport.select()
            .where((ModelExport.model_version_id == record.id) & (ModelExport.project_id == pid))
            .limit(limit)
        ):
            yield ("model_export", export), "exported_as"


def find_object(project: Project, object_id: str) -> Node:
    """The object ``object_id`` of ``project``; another project's object is NotFound."""
    kind = _TYPE_BY_PREFIX.get(object_id.partition("_")[0])
    node = next(_one(kind, object_id, project.id), None) if kind else None
    if node is None:
        raise NotFound(f"no object {object_id!r} with lineage in this project")
    return node


def lineage_graph(project: Project, object_id: str, *, max_nodes: int = MAX_NODES) -> dict:
    """``{root, nodes: [{id, type, label}], edges: [{from, to, kind}], truncated}``."""
    root_kind, root = find_object(project, object_id)
    nodes: dict[str, tuple[str, object]] = {root.id: (root_kind, root)}
    edges: set[Edge] = set()
    truncated = False

    def walk(
        step: Callable[[str, object, int], Iterator[tuple[Node, str]]], upstream: bool
    ) -> None:
        nonlocal truncated
        queue = deque([(root_kind, root)])
        seen = {root.id}
        while queue:
            kind, record = queue.popleft()
            for (other_kind, other), edge_kind in step(kind, record, max_nodes + 1):
                if other.id not in nodes and len(nodes) >= max_nodes:
                    # Full: stop reading this object's neighbours (a dataset version used
                    # by thousands of runs must not load them all to draw a capped graph).
                    truncated = True
                    break
                nodes.setdefault(other.id, (other_kind, other))
                edge = (other.id, record.id) if upstream else (record.id, other.id)
                edges.add((*edge, edge_kind))
                if other.id not in seen:
                    seen.add(other.id)
                    queue.append((other_kind, other))

    walk(_upstream, upstream=True)
    walk(_downstream, upstream=False)
    return {
        "root": root.id,
        "nodes": [
            {"id": node_id, "type": kind, "label": _label(kind, record)}
            for node_id, (kind, record) in sorted(nodes.items())
        ],
        "edges": [{"from": a, "to": b, "kind": k} for a, b, k in sorted(edges)],
        "truncated": truncated,
    }
