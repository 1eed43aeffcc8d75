"""Training-form -> deploy-form conversion (exact up to fp32 rounding)."""
from parnet_cpu.reparam.fuse import fuse_block, fuse_conv_bn, reparameterize

__all__ = ["reparameterize", "fuse_block", "fuse_conv_bn"]
