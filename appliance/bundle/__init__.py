"""Signed offline bundles: build (``build.py``), manifest, signatures, SBOM, the CLI.

The verifier that ships in every bundle is ``bundle/verify.py`` at the repository root: it
imports nothing from here, so a bundle can be checked before any of its code runs.
"""
