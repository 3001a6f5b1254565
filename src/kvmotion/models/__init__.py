"""The wire contract shared by the controller's API, the agent's API and the CLI (pydantic models and enums).

``agent``: VM definitions, runtime and migration reports (what agents take and answer); ``api``: the controller
API's requests and responses; ``findings``: precheck findings; ``moves``: move kinds and phases. Imports nothing
from the rest of kvmotion.
"""
