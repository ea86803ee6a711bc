"""Reproducible OCI images without a Docker daemon, and the local OCI registry.

Definitions live in ``images/<name>/image.toml`` beside their committed lock; ``lock`` pins
the inputs, ``build`` turns a definition and its lock into a deterministic OCI image layout,
``registry`` pushes, pulls and verifies by digest, ``unpack`` and ``runtime`` prepare a runc
bundle, ``envbuild`` layers an EnvironmentDefinition's wheels onto the runner image.
"""
