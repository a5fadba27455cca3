"""hub.yaml: schema (schema.py), sizes (sizes.py), cross-entry rules (checks.py), finding and reading
(loading.py). The bottom layer: it imports nothing else of the hub."""

from mlx_hub.config.loading import (
    Choices,
    ConfigSource,
    default_config_path,
    find_config,
    load_config,
    log_dir_of,
    parse_config,
    read_config,
)
from mlx_hub.config.schema import (
    CONFIG_ENV,
    DEFAULT_CONFIG_NAME,
    DEFAULT_HOME,
    KEY_ENV,
    ORCH_CONFIG_ENV,
    ORCH_CONFIG_NAME,
    REQUEST_OWN_FIELDS,
    SLUG_RE,
    ConfigError,
    GroupConfig,
    HubConfig,
    ModelConfig,
)
from mlx_hub.config.sizes import BUDGET_WORDS, is_budget_word, memory_bytes

__all__ = [
    "BUDGET_WORDS",
    "CONFIG_ENV",
    "DEFAULT_CONFIG_NAME",
    "DEFAULT_HOME",
    "KEY_ENV",
    "ORCH_CONFIG_ENV",
    "ORCH_CONFIG_NAME",
    "REQUEST_OWN_FIELDS",
    "SLUG_RE",
    "Choices",
    "ConfigSource",
    "ConfigError",
    "GroupConfig",
    "HubConfig",
    "ModelConfig",
    "default_config_path",
    "find_config",
    "is_budget_word",
    "load_config",
    "log_dir_of",
    "memory_bytes",
    "parse_config",
    "read_config",
]
