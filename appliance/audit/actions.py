"""Every audit action the appliance records, named ``area:subject:action``."""

from __future__ import annotations

from enum import StrEnum


class Action(StrEnum):
    PROJECT_CREATED = "project:record:created"
    PROJECT_ARCHIVED = "project:record:archived"
    PROJECT_POLICY_UPDATED = "project:policy:updated"
    PROJECT_MEMBER_SET = "project:member:set"
    PROJECT_MEMBER_REMOVED = "project:member:removed"
    DATASET_CREATED = "dataset:record:created"
    DATASET_VERSION_CREATED = "dataset:version:created"
    CODE_REF_CREATED = "code:ref:created"
    ENVIRONMENT_CREATED = "environment:definition:created"
    ENVIRONMENT_LOCK_CREATED = "environment:lock:created"
    POLICY_SNAPSHOT_CREATED = "policy:snapshot:created"
    USER_CREATED = "identity:user:created"
    USER_DEACTIVATED = "identity:user:deactivated"
    SERVICE_ACCOUNT_CREATED = "identity:service_account:created"
    TOKEN_CREATED = "identity:token:created"
    TOKEN_REVOKED = "identity:token:revoked"
    LOGIN_SUCCEEDED = "auth:login:succeeded"
    LOGIN_FAILED = "auth:login:failed"
    REQUEST_DENIED = "authz:request:denied"
    RUN_CREATED = "run:record:created"
    RUN_STATE_CHANGED = "run:state:changed"
    RUN_CANCEL_REQUESTED = "run:cancel:requested"
    RUN_APPROVED = "run:approval:granted"
    ARTIFACT_RECORDED = "run:artifact:recorded"
    SECRET_DELIVERED = "secret:value:delivered"
    DATA_PLANE_REGISTERED = "dataplane:record:registered"
