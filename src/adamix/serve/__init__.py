"""The serving path: one base model answering many attached fine-tunes row by row (MultiTenantModel),
split by role: model (attach, route, run), routing, modules (wrappers), deltas (what a tenant holds),
kernels (the C low-bit kernels and their loader)."""

from .model import MultiTenantModel, Tenant
from .routing import BASE

__all__ = ["BASE", "MultiTenantModel", "Tenant"]
