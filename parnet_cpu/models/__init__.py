"""ParNet model family (torch)."""
from parnet_cpu.models.parnet import (MODEL_CONFIGS, ParNet, ParNetConfig, build_model, count_parameters,
                                      create_model, list_models, resolve_config)

__all__ = ["MODEL_CONFIGS", "ParNet", "ParNetConfig", "build_model", "count_parameters", "create_model",
           "list_models", "resolve_config"]
