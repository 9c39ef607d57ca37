"""Deployment backends: one Target per runtime, looked up by name in targets.base's table (base.get)."""
