"""VISSL-compatible configuration: defaults, presets, override tokens, validation and derived values."""

from dcv2_k8s.config.loader import (ConfigError, Resolved, config_from_checkpoint, env_world, preset_names, resolve,
                                    to_yaml)

__all__ = ["ConfigError", "Resolved", "config_from_checkpoint", "env_world", "preset_names", "resolve", "to_yaml"]
