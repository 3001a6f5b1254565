"""Migration compatibility checks: pure, read-only functions over live facts, every finding at once."""
from kvmotion.checks.context import HostView, MigrationContext
from kvmotion.models.findings import CODES, Finding, Severity, blockers
from kvmotion.checks.rules import run_all

__all__ = ["CODES", "Finding", "HostView", "MigrationContext", "Severity", "blockers", "run_all"]
