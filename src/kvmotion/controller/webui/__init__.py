"""The web client (``/ui``): its sessions (a cookie in place of the bearer token, with a CSRF token), the static
page it serves, and the security headers around it. The page itself is plain JavaScript in ``static/``
(docs/web-client.md)."""
