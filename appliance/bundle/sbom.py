"""The bundle's software bill of materials, CycloneDX 1.6 JSON (cyclonedx-python-lib).

Components: every wheel in offline-wheels/, every image (by manifest digest) and what each
image was built from (its locked Debian packages and wheels), each with its SHA-256 and a
package URL. Same inputs, same bytes: the serial number and timestamp derive from them.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from cyclonedx.model import HashAlgorithm, HashType
from cyclonedx.model.bom import Bom
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.output.json import JsonV1Dot6
from packageurl import PackageURL

from appliance.images.lock import ImageLock
from appliance.images.packages import Wheel


@dataclass(frozen=True)
class ImageEntry:
    """One image of the bundle and the lock it was built from."""

    name: str
    digest: str
    lock: ImageLock


def _sha256(value: str) -> list[HashType]:
    return [HashType(alg=HashAlgorithm.SHA_256, content=value)]


def _wheel_component(wheel: Wheel) -> Component:
    purl = PackageURL(type="pypi", name=wheel.name, version=wheel.version)
    return Component(
        name=wheel.name,
        version=wheel.version,
        type=ComponentType.LIBRARY,
        purl=purl,
        bom_ref=f"{purl}#{wheel.filename}",
        hashes=_sha256(wheel.sha256),
    )


def render_sbom(
    version: str,
    created: dt.datetime,
    wheels: Iterable[Wheel],
    images: Iterable[ImageEntry],
) -> str:
    """The SBOM document for a bundle of VERSION."""
    bom = Bom()
    wheels, images = list(wheels), list(images)
    seed = version + "".join(w.sha256 for w in wheels) + "".join(i.digest for i in images)
    bom.serial_number = uuid.uuid5(uuid.NAMESPACE_URL, f"animus-bundle:{seed}")
    bom.metadata.timestamp = created
    product = Component(
        name="animus-datalab",
        version=version,
        type=ComponentType.APPLICATION,
        bom_ref=f"animus-datalab@{version}",
    )
    bom.metadata.component = product
    seen: dict[str, Component] = {}

    def add(component: Component) -> Component:
        key = str(component.bom_ref.value)
        if key not in seen:
            seen[key] = component
            bom.components.add(component)
        return seen[key]

    bom.register_dependency(product, [add(_wheel_component(w)) for w in wheels])
    for image in images:
        image_component = add(
            Component(
                name=image.name,
                version=image.digest,
                type=ComponentType.CONTAINER,
                purl=PackageURL(type="oci", name=image.name, version=image.digest),
                bom_ref=f"image:{image.name}@{image.digest}",
                hashes=_sha256(image.digest.removeprefix("sha256:")),
            )
        )
        parts = [
            add(
                Component(
                    name=deb.name,
                    version=deb.version,
                    type=ComponentType.LIBRARY,
                    purl=PackageURL(
                        type="deb",
                        namespace="debian",
                        name=deb.name,
                        version=deb.version,
                        qualifiers={"arch": deb.architecture},
                    ),
                    bom_ref=f"deb:{deb.name}@{deb.version}:{deb.architecture}",
                    hashes=_sha256(deb.sha256),
                )
            )
            for deb in image.lock.debian
        ]
        parts += [add(_wheel_component(w)) for w in image.lock.wheels]
        bom.register_dependency(image_component, parts)
        bom.register_dependency(product, [image_component])
    return JsonV1Dot6(bom).output_as_string(indent=1)
