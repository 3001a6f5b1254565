"""The lab's record: a JSON state file naming everything the lab made, written before it is made."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kvmotion_lab.netns import LabError



class Record:
    """The JSON state file; every change is written atomically at once."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data

    @classmethod
    def create(cls, path: Path, data: dict[str, Any]) -> "Record":
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # O_EXCL: two concurrent lab_up calls cannot both own the record.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise LabError(f"lab already up (state file {path}); run `kvmotion lab down` first") from None
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        return cls(path, data)

    @classmethod
    def load(cls, path: Path) -> "Record | None":
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or not isinstance(data.get("objects"), list):
                raise ValueError("not a lab record")
        except ValueError as e:
            raise LabError(
                f"state file {path} is not a readable lab record ({e}); inspect it, remove the "
                f"listed namespaces/links by hand and delete the file"
            ) from e
        return cls(path, data)

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    @property
    def objects(self) -> list[dict[str, Any]]:
        return self.data["objects"]

    def add(self, obj: dict[str, Any]) -> None:
        self.objects.append(obj)
        self.save()

    def discard(self, obj: dict[str, Any]) -> None:
        if obj in self.objects:
            self.objects.remove(obj)
            self.save()
