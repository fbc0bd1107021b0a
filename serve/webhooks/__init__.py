"""Signed `video.*` webhooks: signatures, the SSRF guard for URLs, and background delivery."""
