"""The controller's REST API, one router per domain; :func:`kvmotion.controller.api.create_app` wires them."""
