"""The baseline: every table as the controller made it before migrations (create_all, release 0.1.0).

Frozen here, never edited: later changes are revisions after this one. A database made by ``create_all`` (its
tables, no ``alembic_version``) is adopted at this revision: ``METADATA`` creates what an older release had not
made yet (checkfirst), and the database is stamped ``0001`` (``kvmotion.controller.schema``).
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None

METADATA = sa.MetaData()


def _text(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.Text, nullable=nullable)


def _str(name: str, length: int, nullable: bool = False, **kw: object) -> sa.Column:
    return sa.Column(name, sa.String(length), nullable=nullable, **kw)


def _num(name: str, kind: type = sa.Float) -> sa.Column:
    return sa.Column(name, kind, nullable=False)


def _key(name: str, length: int) -> sa.Column:
    return sa.Column(name, sa.String(length), primary_key=True)


sa.Table("hosts", METADATA, _key("name", 64), _str("address", 256), _str("state", 32), _text("facts_json"),
         _num("last_seen"), _num("added_at"), _text("last_error"), _num("maintenance", sa.Integer),
         _str("cluster", 64, nullable=True), _text("secret_wrapped"))
sa.Table("pending_hosts", METADATA, _key("name", 64), _str("address", 256), _text("secret_wrapped"),
         _str("fingerprint", 64), _text("facts_json"), _str("token", 64), _num("requested_at"))
sa.Table("host_identities", METADATA, _key("host", 64), _str("fingerprint", 64), _text("addresses_json"),
         _text("serials_json"), _str("approved_by", 64), _num("approved_at"))
sa.Table("agent_pins", METADATA, _key("host", 64), _text("pems_json"), _num("pinned_at"))
sa.Table("revoked_certs", METADATA, _key("serial", 64), _str("host", 64), _num("revoked_at"))
sa.Table("clusters", METADATA, _key("name", 64), _str("evc_mode", 64, nullable=True), _text("policy_json"))
sa.Table("datastores", METADATA, _key("uuid", 64), _str("name", 128), _str("kind", 32),
         _num("shared", sa.Integer))
sa.Table("host_datastores", METADATA,
         sa.Column("host", sa.String(64), sa.ForeignKey("hosts.name", ondelete="CASCADE"), primary_key=True),
         sa.Column("datastore", sa.String(64), sa.ForeignKey("datastores.uuid", ondelete="CASCADE"),
                   primary_key=True),
         _text("path"), _num("accessible", sa.Integer), _num("free_mb", sa.Integer))
sa.Table("networks", METADATA,
         sa.Column("host", sa.String(64), sa.ForeignKey("hosts.name", ondelete="CASCADE"), primary_key=True),
         _key("name", 128), _str("bridge", 32))
sa.Table("vms", METADATA, _key("uuid", 36), _str("name", 64, unique=True),
         sa.Column("host", sa.String(64), sa.ForeignKey("hosts.name"), nullable=False), _str("power_state", 16),
         _text("spec_json"), _text("policy_json"), _num("created_at"), _num("updated_at"))
sa.Table("tasks", METADATA, _key("id", 36), _str("kind", 32), _str("vm_uuid", 36, index=True),
         _str("vm_name", 64), _str("source", 64), _str("destination", 64), _str("state", 16), _str("phase", 32),
         _num("progress"), _text("phases_json"), _text("progress_json"), _text("options_json"),
         _text("result_json"), _text("error_json"), _num("created_at"), _num("updated_at"), _num("started_at"),
         _num("finished_at"))
sa.Table("images", METADATA, _key("name", 64), _str("state", 16), _str("source_format", 16), _str("format", 16),
         _num("virtual_bytes", sa.Integer), _num("file_bytes", sa.Integer), _str("sha256", 64),
         _text("copies_json"), _num("created_at"))
sa.Table("api_tokens", METADATA, _key("id", 16), _str("name", 64, unique=True), _str("role", 16), _str("hash", 64),
         _num("created_at"), _num("expires_at"), _num("revoked_at"), _num("last_used"))
sa.Table("audit", METADATA, sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
         sa.Column("at", sa.Float, nullable=False, index=True), _str("who", 64), _str("role", 16),
         _str("method", 8), _str("path", 512), _num("status", sa.Integer), _str("client", 64))
sa.Table("domain_self", METADATA, sa.Column("id", sa.Integer, primary_key=True), _str("domain_id", 64),
         _str("domain_name", 64), _str("name", 64), _str("url", 264), _num("since"))
sa.Table("domain_members", METADATA, _key("name", 64), _str("url", 264), _str("state", 16), _text("ca_pem"),
         _str("fingerprint", 100), _text("client_pem"), _str("client_sha256", 64, index=True), _num("since"),
         _str("approved_by", 64), _num("last_contact"), _str("version", 64))


def upgrade() -> None:
    METADATA.create_all(op.get_bind())


def downgrade() -> None:
    METADATA.drop_all(op.get_bind())
