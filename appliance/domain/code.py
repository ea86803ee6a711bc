"""CodeRefs: a repository and an exact commit (or, for non-production work, a branch or tag)."""

from __future__ import annotations

import re

from appliance import db
from appliance.audit import log as audit
from appliance.audit.actions import Action
from appliance.domain.context import Context
from appliance.domain.records import CodeRef, Project, new_id
from appliance.errors import NotFound, ValidationFailed

COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
# git check-ref-format, the parts that matter: no '..', no control chars, no ' ~^:?*[\'.
GIT_REF = re.compile(r"^(?!.*\.\.)(?!/)(?!.*//)(?!.*@\{)[^\x00-\x20~^:?*\[\\]{1,255}(?<![/.])$")
REPO_URL = re.compile(r"^(https?|ssh|git|file)://\S+$|^[\w.-]+@[\w.-]+:\S+$")

BRANCH_LIMITATION = "code ref is a branch or tag, not a commit: the Run cannot be production"


def limitations(code_ref: CodeRef) -> list[str]:
    return [] if code_ref.production_ready else [BRANCH_LIMITATION]


def create_code_ref(
    ctx: Context,
    project: Project,
    repo_url: str,
    *,
    commit_sha: str | None = None,
    ref: str | None = None,
    path: str = "",
) -> CodeRef:
    problems = []
    if not REPO_URL.match(repo_url) or len(repo_url) > 2048:
        problems.append({"field": "repo_url", "problem": "not a git URL (https, ssh, git, file)"})
    if (commit_sha is None) == (ref is None):
        problems.append({"field": "commit_sha", "problem": "give exactly one of commit_sha or ref"})
    if commit_sha is not None and not COMMIT_SHA.match(commit_sha.lower()):
        problems.append({"field": "commit_sha", "problem": "must be 40 hexadecimal characters"})
    if ref is not None and not GIT_REF.match(ref):
        problems.append({"field": "ref", "problem": "not a valid git branch or tag name"})
    if path and (path.startswith("/") or ".." in path.split("/")):
        problems.append({"field": "path", "problem": "must be relative and stay in the repository"})
    if problems:
        raise ValidationFailed("the code ref is not valid", details={"errors": problems})
    with db.write_transaction():
        code_ref = CodeRef.create(
            id=new_id("code"),
            project_id=project.id,
            repo_url=repo_url,
            commit_sha=commit_sha.lower() if commit_sha else None,
            ref=ref,
            path=path,
            production_ready=commit_sha is not None,
            created_by=ctx.principal.actor,
        )
        audit.record(
            ctx,
            Action.CODE_REF_CREATED,
            project_id=project.id,
            object_type="code_ref",
            object_id=code_ref.id,
            payload={
                "repo_url": repo_url,
                "commit_sha": code_ref.commit_sha,
                "ref": ref,
                "path": path,
                "limitations": limitations(code_ref),
            },
        )
    return code_ref


def code_ref_in(project: Project, code_ref_id: str) -> CodeRef:
    found = CodeRef.get_or_none((CodeRef.id == code_ref_id) & (CodeRef.project_id == project.id))
    if found is None:
        raise NotFound(f"no code ref {code_ref_id!r} in this project")
    return found
