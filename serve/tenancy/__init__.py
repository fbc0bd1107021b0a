"""Tenants, their API keys and their plans: the first thing the ingress does with a request.

`Authorization: Bearer vg_...` → `keys.KeyRing.authenticate` → `Principal(tenant, plan, key_id)` →
`plans.PlansConfig.resolve(plan)` → the plan's per-request ceilings (`plans.check_cost`) and the limits the
quota / rate-limit stage enforces. The keys file is written by the operator CLI (`python -m serve.tenancy.admin`)
and mounted read-only into the ingress; nothing here talks to S3 or Ray.
"""

from serve.tenancy.keys import KeyEntry, KeyRing, KeysConfig, Principal, keyring_from_config
from serve.tenancy.plans import Plan, PlansConfig, check_cost, cost_of

__all__ = [
    "KeyEntry", "KeyRing", "KeysConfig", "Principal", "keyring_from_config",
    "Plan", "PlansConfig", "check_cost", "cost_of",
]
