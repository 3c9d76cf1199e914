"""VISSL-compatible configuration: defaults, presets, override tokens, validation, derived values, typed result."""

from dcv2_k8s.config.loader import (ConfigError, Resolved, config_from_checkpoint, load_resolved, preset_names,
                                    resolve, to_yaml, write_resolved)
from dcv2_k8s.schema import Config

__all__ = ["Config", "ConfigError", "Resolved", "config_from_checkpoint", "load_resolved", "preset_names", "resolve",
           "to_yaml", "write_resolved"]
