"""EnvironmentDefinitions and the EnvironmentLocks that pin them to an image digest."""

from __future__ import annotations

import hashlib
import re

from appliance import db
from appliance.audit import log as audit
from appliance.audit.actions import Action
from appliance.domain.context import Context
from appliance.domain.records import (
    OBJECT_NAME,
    EnvironmentDefinition,
    EnvironmentLock,
    Project,
    canonical_json,
    create_named,
    new_id,
)
from appliance.errors import AnimusError, NotFound, ValidationFailed

IMAGE_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# A requirement as pip reads it, kept to the forms a definition needs: name, extras, specifier.
REQUIREMENT = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9._,-]+\])?"
    r"(\s*(==|>=|<=|~=|!=|<|>)\s*[A-Za-z0-9.*+!-]+(\s*,\s*(==|>=|<=|~=|!=|<|>)\s*[A-Za-z0-9.*+!-]+)*)?$"
)
PACKAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
PACKAGE_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")


def create_environment(
    ctx: Context,
    project: Project,
    name: str,
    base_image: str,
    packages: list[str],
    description: str = "",
) -> EnvironmentDefinition:
    problems = []
    if not OBJECT_NAME.match(name):
        problems.append({"field": "name", "problem": "letters, digits, '.', '_' or '-', 1-100"})
    if not base_image or len(base_image) > 512 or any(c.isspace() for c in base_image):
        problems.append({"field": "base_image", "problem": "an image name without spaces"})
    for index, requirement in enumerate(packages):
        if not REQUIREMENT.match(requirement):
            problems.append(
                {"field": f"packages/{index}", "problem": f"not a requirement: {requirement!r}"}
            )
    if problems:
        raise ValidationFailed("the environment is not valid", details={"errors": problems})
    with db.write_transaction():
        environment = create_named(
            EnvironmentDefinition,
            "an environment",
            id=new_id("env"),
            project_id=project.id,
            name=name,
            base_image=base_image,
            packages=packages,
            description=description,
            created_by=ctx.principal.actor,
        )
        audit.record(
            ctx,
            Action.ENVIRONMENT_CREATED,
            project_id=project.id,
            object_type="environment",
            object_id=environment.id,
            payload={"name": name, "base_image": base_image, "packages": packages},
        )
    return environment


def environment_in(project: Project, environment_id: str) -> EnvironmentDefinition:
    found = EnvironmentDefinition.get_or_none(
        (EnvironmentDefinition.id == environment_id)
        & (EnvironmentDefinition.project_id == project.id)
    )
    if found is None:
        raise NotFound(f"no environment {environment_id!r} in this project")
    return found


def lock_digest(image_digest: str, packages: list[dict]) -> str:
    content = {"image_digest": image_digest, "packages": sorted(packages, key=lambda p: p["name"])}
    return "sha256:" + hashlib.sha256(canonical_json(content).encode()).hexdigest()


def create_lock(
    ctx: Context, project: Project, environment_id: str, image_digest: str, packages: list[dict]
) -> EnvironmentLock:
    environment = EnvironmentDefinition.get_or_none(EnvironmentDefinition.id == environment_id)
    if environment is not None and environment.project_id != project.id:
        raise AnimusError(
            "the environment belongs to another project",
            code="cross_project_reference",
            details={"field": "environment_id"},
        )
    problems = []
    if environment is None:
        problems.append({"field": "environment_id", "problem": "no such environment"})
    if not IMAGE_DIGEST.match(image_digest):
        raise AnimusError(
            "image_digest must be sha256: followed by 64 lowercase hex digits",
            code="invalid_digest",
            details={"field": "image_digest"},
        )
    names = set()
    for index, package in enumerate(packages):
        if not PACKAGE_NAME.match(package["name"]):
            problems.append({"field": f"packages/{index}/name", "problem": "not a package name"})
        if not PACKAGE_HASH.match(package["sha256"]):
            raise AnimusError(
                f"packages/{index}/sha256 must be sha256: followed by 64 lowercase hex digits",
                code="invalid_digest",
                details={"field": f"packages/{index}/sha256"},
            )
        if package["name"].lower() in names:
            problems.append({"field": f"packages/{index}/name", "problem": "listed twice"})
        names.add(package["name"].lower())
    if problems:
        raise ValidationFailed("the environment lock is not valid", details={"errors": problems})
    digest = lock_digest(image_digest, packages)
    with db.write_transaction():
        lock = EnvironmentLock.create(
            id=new_id("lock"),
            project_id=project.id,
            environment_id=environment.id,
            image_digest=image_digest,
            packages=sorted(packages, key=lambda p: p["name"]),
            digest=digest,
            created_by=ctx.principal.actor,
        )
        audit.record(
            ctx,
            Action.ENVIRONMENT_LOCK_CREATED,
            project_id=project.id,
            object_type="environment_lock",
            object_id=lock.id,
            payload={
                "environment_id": environment.id,
                "image_digest": image_digest,
                "digest": digest,
                "packages": len(packages),
            },
        )
    return lock


def lock_in(project: Project, lock_id: str) -> EnvironmentLock:
    found = EnvironmentLock.get_or_none(
        (EnvironmentLock.id == lock_id) & (EnvironmentLock.project_id == project.id)
    )
    if found is None:
        raise NotFound(f"no environment lock {lock_id!r} in this project")
    return found
