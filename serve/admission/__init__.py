"""Admission: every gate a request passes before a job exists (limits, idempotency, prompt policy)."""
