"""Prism's application: pure request/routing logic; only app.py imports Ray."""
