"""Turn the reconcile cycle's actions into hypervisor, volume and image operations.

Every operation is idempotent and safe to retry: ``start`` verifies the
image, prepares the disks under the action's epoch (the volume layer
refuses an epoch older than one it has seen), redefines the domain with
the epoch in its metadata and boots it (a running domain is left alone);
``stop`` / ``destroy`` / ``pause`` / ``resume`` of an appliance that is
already in the wanted state, or not defined here, do nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from meshcloud.agent.images import ImageCatalog, VerifiedImage
from meshcloud.agent.volumes import ApplianceVolumes
from meshcloud.core.errors import InvalidInput, NotFound
from meshcloud.core.models import ApplianceSpec
from meshcloud.hypervisor.base import Hypervisor
from meshcloud.hypervisor.domain_xml import (
    Accel,
    DiskAttachment,
    HostDetails,
    KernelBoot,
    NetworkAttachment,
    tap_name,
)

log = logging.getLogger("meshcloud.agent")


@dataclass(frozen=True)
class HostSettings:
    """What this rack puts around every appliance: bridge, address prefix, logs, KVM or not."""

    bridge: str | None = "mcbr0"
    prefix_len: int = 24
    gateway: str | None = None
    console_dir: Path | None = None
    kvm: str = "auto"  # auto | on | off (hypervisor.kvm)
    stop_timeout_s: float = 20.0


class ActionExecutor:
    """Runs one action at a time on this rack's hypervisor (async; blocking work on threads)."""

    def __init__(
        self,
        hypervisor: Hypervisor,
        volumes: ApplianceVolumes | None,
        images: ImageCatalog,
        settings: HostSettings,
    ) -> None:
        self.hv = hypervisor
        self.volumes = volumes
        self.images = images
        self.settings = settings
        self._accel: Accel | None = None

    async def _choose_accel(self, image: VerifiedImage) -> Accel:
        if self._accel is not None:
            return self._accel
        from meshcloud.hypervisor.kvm import choose_accel, decide_accel, kvm_device_usable

        if image.kernel is not None and image.initrd is not None:
            accel, why = await asyncio.to_thread(
                choose_accel, self.settings.kvm, image.kernel, image.initrd
            )
        else:  # nothing to probe KVM with: use it only when asked to
            accel = decide_accel(
                "off" if self.settings.kvm == "auto" else self.settings.kvm,
                kvm_device_usable(),
                None,
            )
            why = f"hypervisor.kvm is {self.settings.kvm}"
        log.info("appliances on this rack run with %s (%s)", accel.value.upper(), why)
        self._accel = accel
        return accel

    def host_details(
        self,
        spec: ApplianceSpec,
        epoch: int,
        cluster_id: str,
        image: VerifiedImage,
        disks: dict[str, Path],
        accel: Accel,
    ) -> HostDetails:
        """The rack-side half of the domain definition (pure given its inputs)."""
        s = self.settings
        boot = None
        if image.kernel is not None and image.initrd is not None:
            boot = KernelBoot(image.kernel, image.initrd)
        network = None
        if s.bridge:
            network = NetworkAttachment(s.bridge, s.prefix_len, s.gateway, tap_name(spec.name))
        missing = [d.name for d in spec.disks if d.name not in disks]
        if missing:
            raise InvalidInput(f"appliance {spec.name}: no volume for disk(s) {missing}")
        return HostDetails(
            cluster_id=cluster_id,
            disks=tuple(DiskAttachment(d.name, disks[d.name]) for d in spec.disks),
            network=network,
            boot=boot,
            accel=accel,
            epoch=epoch,
            console_log=(s.console_dir / f"{spec.name}.log") if s.console_dir else None,
        )

    async def async_start(self, spec: ApplianceSpec, epoch: int, cluster_id: str) -> None:
        """Verify the image, prepare the disks under ``epoch``, (re)define and boot."""
        t0 = time.monotonic()
        image = await asyncio.to_thread(self.images.verify, spec.image)
        accel = await self._choose_accel(image)
        t1 = time.monotonic()
        disks: dict[str, Path] = {}
        if spec.disks:
            if self.volumes is None:
                raise InvalidInput(f"appliance {spec.name} has disks but this rack has no volumes")
            disks = await asyncio.to_thread(self.volumes.prepare, spec, epoch, image.templates())
        if self.settings.console_dir is not None:
            await asyncio.to_thread(self.settings.console_dir.mkdir, parents=True, exist_ok=True)
        host = self.host_details(spec, epoch, cluster_id, image, disks, accel)
        t2 = time.monotonic()
        await self.hv.async_define(spec, host)
        t3 = time.monotonic()
        await self.hv.async_start(spec.name)
        t4 = time.monotonic()
        log.info(
            "started %s under epoch %d in %.2f s (image %.2f, disks %.2f, define %.2f, boot %.2f)",
            spec.name, epoch, t4 - t0, t1 - t0, t2 - t1, t3 - t2, t4 - t3,
        )  # fmt: skip

    async def async_stop(self, appliance: str) -> None:
        with contextlib.suppress(NotFound):
            await self.hv.async_stop(appliance, timeout_s=self.settings.stop_timeout_s)

    async def async_destroy(self, appliance: str) -> None:
        with contextlib.suppress(NotFound):
            await self.hv.async_destroy(appliance)

    async def async_pause(self, appliance: str) -> None:
        with contextlib.suppress(NotFound):
            await self.hv.async_pause(appliance)

    async def async_resume(self, appliance: str) -> None:
        with contextlib.suppress(NotFound):
            await self.hv.async_resume(appliance)

    async def async_forget(self, appliance: str) -> Path | None:
        """An appliance deleted from the map: undefine its (stopped) VM, retire its volumes."""
        with contextlib.suppress(NotFound):
            await self.hv.async_undefine(appliance)
        if self.volumes is None:
            return None
        return await asyncio.to_thread(self.volumes.retire, appliance)
