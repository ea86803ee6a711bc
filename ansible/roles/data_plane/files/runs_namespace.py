"""Print, as JSON, the runs namespace objects the appliance itself defines.

The Namespace (Pod Security ``restricted``), its default-deny NetworkPolicy and the Data
Plane agent's Role and RoleBinding come from ``namespace_manifests`` — the same function
`animus dataplane render --namespace` prints — so the installer and the Kubernetes backend
can never disagree on them. Settings come from the ANIMUS_K8S_* variables.

usage: python runs_namespace.py AGENT_NAMESPACE AGENT_SERVICE_ACCOUNT
"""

import json
import os
import sys

from appliance.execution.kubernetes_manifests import KubernetesSettings, namespace_manifests

agent_namespace, agent_service_account = sys.argv[1:3]
manifests = namespace_manifests(
    KubernetesSettings.from_env(os.environ),
    agent_namespace=agent_namespace,
    agent_service_account=agent_service_account,
)
json.dump(manifests, sys.stdout)
