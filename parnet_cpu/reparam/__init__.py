"""Training-form -> deploy-form conversion (exact up to fp32 rounding)."""
from parnet_cpu.reparam.fuse import reparameterize

__all__ = ["reparameterize"]
