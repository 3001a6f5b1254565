"""The controllers of one database and which of them leads (``controller.leader``; GET /api/v1/controllers)."""
from __future__ import annotations

from pydantic import BaseModel


class LeaderOut(BaseModel):
    name: str
    url: str                # where the followers hand state-changing calls on
    term: int               # +1 at every takeover
    since: float            # when it took over (seconds since the epoch)


class ThisController(BaseModel):
    name: str
    url: str
    leader: bool


class TakeoverBounds(BaseModel):
    process_death: float    # the leader's process died: a follower leads within this (then reconciles)
    machine_loss: float     # its machine or network vanished


class ControllersOut(BaseModel):
    this: ThisController
    leader: LeaderOut | None     # None: none known (a takeover is under way)
    backend: str                 # sqlite (one controller, always the leader) or postgresql
    takeover_s: TakeoverBounds
