"""The image library's records: one row per image, and which VMs use it (typed functions over the database)."""
from __future__ import annotations

import json
import time

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from kvmotion.common.errors import ConflictError, InvalidInputError, NotFoundError
from kvmotion.controller.db import VM, Image
from kvmotion.models.agent import VMSpec
from kvmotion.models.boot import ImageSource
from kvmotion.models.images import AgentImageResult, ImageCopy, ImageOut, image_file

Sessions = sessionmaker[Session]


def image_out(row: Image) -> ImageOut:
    return ImageOut(name=row.name, state=row.state, source_format=row.source_format, format=row.format,
                    virtual_bytes=row.virtual_bytes, file_bytes=row.file_bytes, sha256=row.sha256,
                    copies=[ImageCopy.model_validate(c) for c in json.loads(row.copies_json or "[]")],
                    created_at=row.created_at)


def list_images(sessions: Sessions) -> list[ImageOut]:
    with sessions() as s:
        return [image_out(r) for r in s.scalars(select(Image).order_by(Image.name)).all()]


def get_image(sessions: Sessions, name: str) -> ImageOut:
    with sessions() as s:
        row = s.get(Image, name)
        if row is None:
            known = ", ".join(s.scalars(select(Image.name).order_by(Image.name)).all()) or "none"
            raise NotFoundError(f"image {name!r} is not in the library (known: {known})",
                                remedy="check the name with `kvmotion image list`, or import it first",
                                details={"image": name})
        return image_out(row).model_copy(update={"used_by": users(sessions, name)})


def reserve(sessions: Sessions, name: str, datastore: str) -> None:
    """Claim the name (state ``importing``) before any file is written: a second import of it is refused."""
    exists = ConflictError(f"image {name!r} already exists", remedy="choose another name, or delete the old image "
                           f"first: kvmotion image delete {name}", details={"image": name})
    try:
        with sessions.begin() as s:
            if s.get(Image, name) is not None:
                raise exists
            s.add(Image(name=name, state="importing", created_at=time.time(),
                        copies_json=json.dumps([{"datastore": datastore, "path": image_file(name)}])))
    except IntegrityError:
        raise exists from None


def complete(sessions: Sessions, name: str, result: AgentImageResult) -> ImageOut:
    with sessions.begin() as s:
        row = s.get(Image, name)
        if row is None:
            raise NotFoundError(f"image {name!r} vanished during its import", remedy="import it again")
        row.state, row.source_format, row.format = "ready", result.source_format, "qcow2"
        row.virtual_bytes, row.file_bytes, row.sha256 = result.virtual_bytes, result.file_bytes, result.sha256
        row.copies_json = json.dumps([{"datastore": result.datastore, "path": result.path}])
    return get_image(sessions, name)


def forget(sessions: Sessions, name: str) -> None:
    with sessions.begin() as s:
        s.execute(delete(Image).where(Image.name == name))


def users(sessions: Sessions, name: str) -> list[str]:
    """VMs made from the image: a full clone records its source, a linked clone has it as its base."""
    with sessions() as s:
        row = s.get(Image, name)
        copies = {(c["datastore"], c["path"]) for c in json.loads(row.copies_json or "[]")} if row else set()
        out = []
        for vm in s.scalars(select(VM).order_by(VM.name)).all():
            spec = VMSpec.model_validate_json(vm.spec_json)
            if spec.source_image == name or any((d.datastore, d.backing) in copies for d in spec.disks if d.backing):
                out.append(vm.name)
        return out


def source_for(sessions: Sessions, name: str, clone: str, host: str, readable: list[str],
               vm_datastore: str | None) -> ImageSource:
    """The copy a new VM's boot disk is made from, on a datastore its host mounts.

    A full clone reads any copy the host mounts (the VM's own datastore first); a linked clone needs a copy on the
    VM's datastore. Nothing is copied behind the user's back: a missing copy is an error that says what to do.
    """
    image = get_image(sessions, name)
    if image.state != "ready":
        raise ConflictError(f"image {name!r} is still being imported", remedy="wait for the import to finish")
    where = ", ".join(c.datastore for c in image.copies) or "none"
    mounted = [c for c in image.copies if c.datastore in readable]
    if not mounted:
        raise InvalidInputError(f"image {name!r} is on datastore(s) {where}; host {host} mounts none of them",
                                remedy=f"create the VM on a host that mounts {where}, or import the image to a "
                                "datastore of this host under another name (kvmotion image import)",
                                details={"image": name, "datastores": [c.datastore for c in image.copies]})
    if vm_datastore is not None:
        here = [c for c in mounted if c.datastore == vm_datastore]
        if clone == "linked" and not here:
            raise InvalidInputError(f"a linked clone lives on its image's datastore; image {name!r} is on {where}, "
                                    f"not on {vm_datastore}", remedy=f"drop --datastore (the VM then lives on "
                                    f"{mounted[0].datastore}), or use --clone full (a copy on {vm_datastore})")
        mounted = here or mounted
    return ImageSource(datastore=mounted[0].datastore, path=mounted[0].path, clone=clone)
