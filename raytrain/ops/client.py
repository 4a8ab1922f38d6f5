"""The Kubernetes calls of `raytrain ops`, through the official client's CustomObjectsApi."""

from __future__ import annotations

import logging
from typing import Any

from raytrain.ops import manifests

log = logging.getLogger(__name__)


def custom_objects_api(context: str | None = None) -> Any:
    """A CustomObjectsApi for the current kubeconfig context, or the in-cluster service account."""
    from kubernetes import client, config

    try:
        config.load_kube_config(context=context)
    except config.ConfigException:
        config.load_incluster_config()
    return client.CustomObjectsApi()


class RayOps:
    """RayJob and RayService operations in one namespace. `api` is a CustomObjectsApi (or a stand-in)."""

    def __init__(self, api: Any, namespace: str) -> None:
        self.api = api
        self.namespace = namespace

    def _args(self, plural: str) -> dict[str, str]:
        return {"group": manifests.GROUP, "version": manifests.VERSION, "namespace": self.namespace, "plural": plural}

    def submit(self, job: dict[str, Any]) -> dict[str, Any]:
        log.info("creating RayJob %s/%s", self.namespace, job["metadata"]["name"])
        return self.api.create_namespaced_custom_object(body=job, **self._args("rayjobs"))

    def jobs(self) -> list[dict[str, Any]]:
        listed = self.api.list_namespaced_custom_object(
            label_selector="app.kubernetes.io/part-of=raytrain", **self._args("rayjobs")
        )
        return sorted(listed.get("items", []), key=lambda o: o["metadata"].get("creationTimestamp") or "")

    def service(self, name: str) -> dict[str, Any]:
        return self.api.get_namespaced_custom_object(name=name, **self._args("rayservices"))

    def rollout(self, name: str, model: str, path: str, app_name: str | None = None,
                registry: dict[str, str] | None = None) -> dict[str, Any]:
        patch = manifests.rollout_patch(self.service(name), model, path, app_name, registry)
        return self._patch_service(name, patch)

    def rollback(self, name: str, app_name: str | None = None) -> dict[str, Any]:
        patch = manifests.rollback_patch(self.service(name), app_name)
        return self._patch_service(name, patch)

    def _patch_service(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        # A dict body is sent as a JSON merge patch: only serveConfigV2 and the annotation change, so
        # KubeRay applies the new Serve config in place (no new Ray cluster).
        log.info("patching RayService %s/%s", self.namespace, name)
        return self.api.patch_namespaced_custom_object(name=name, body=patch, **self._args("rayservices"))
