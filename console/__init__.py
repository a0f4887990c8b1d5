"""The web console: server-rendered pages at `/console`, their assets, the signed session
that guards them, and the browser test call."""
