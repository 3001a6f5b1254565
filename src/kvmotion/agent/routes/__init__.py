"""The agent's REST API, one router per domain; :func:`kvmotion.agent.api.create_app` wires them."""
