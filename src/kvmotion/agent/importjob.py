"""Image imports as jobs on the agent: the checks run at once (bad input is refused by the request itself), the
copy (convert, check, checksum) runs in a thread whose phase and percent the controller polls."""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from pathlib import Path

from kvmotion.agent import imagelib
from kvmotion.agent.context import HostContext
from kvmotion.common.errors import KvmotionError, NotFoundError
from kvmotion.models.images import AgentImageImport, AgentImportStatus

log = logging.getLogger(__name__)
KEEP_FINISHED_S = 3600.0        # a finished job's outcome stays readable this long


class ImportJobs:
    """The agent's import jobs by id."""

    def __init__(self) -> None:
        self.jobs: dict[str, AgentImportStatus] = {}
        self._finished_at: dict[str, float] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def start(self, ctx: HostContext, req: AgentImageImport, extra_roots: list[Path]) -> AgentImportStatus:
        self._prune()
        plan = await asyncio.to_thread(imagelib.prepare, ctx, req, extra_roots)
        job = AgentImportStatus(job=secrets.token_hex(8), name=req.name)
        self.jobs[job.job] = job
        self._tasks[job.job] = asyncio.create_task(self._run(job, plan), name=f"image-import-{req.name}")
        return job.model_copy()

    async def _run(self, job: AgentImportStatus, plan: imagelib.ImportPlan) -> None:
        def report(phase: str, percent: float) -> None:
            job.phase, job.percent = phase, percent
        try:
            job.result = await asyncio.to_thread(imagelib.store, plan, report)
            job.state, job.percent = "success", 100.0
        except KvmotionError as exc:
            job.state, job.error = "error", exc.to_dict()
        except Exception as exc:  # noqa: BLE001 - the controller learns of it through the job
            log.exception("image import %s failed", job.name)
            job.state, job.error = "error", {"code": "INTERNAL", "message": f"import failed: {exc}",
                                             "remedy": "see the agent's log"}
        finally:
            self._finished_at[job.job] = time.monotonic()
            self._tasks.pop(job.job, None)

    def status(self, job: str) -> AgentImportStatus:
        if job not in self.jobs:
            raise NotFoundError(f"no image import job {job!r} on this host", remedy="start the import again")
        return self.jobs[job].model_copy()

    def _prune(self) -> None:
        now = time.monotonic()
        for job, at in list(self._finished_at.items()):
            if now - at > KEEP_FINISHED_S:
                self.jobs.pop(job, None)
                self._finished_at.pop(job)

    def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
