"""Animus Datalab appliance: the control plane, data plane agents and build tools."""

__version__ = "0.1.0"
