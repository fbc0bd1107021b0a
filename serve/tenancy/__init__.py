"""Tenants, their API keys and their plans: the first thing the ingress does with a request.

`Authorization: Bearer vg_...` -> `keys.KeyRing.authenticate` -> `Principal(tenant, plan, key_id)` ->
`plans.resolve_plan(plan)` -> the plan's per-request ceilings (`plans.check_cost`) and the limits the admission
gate enforces. The keys file is written by the operator CLI (`python -m serve.tenancy.admin`) and mounted
read-only into the ingress; nothing here talks to S3 or Ray.
"""
