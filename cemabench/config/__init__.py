"""The configuration vocabulary, torch-free: the protocol's fields (:mod:`.fields`) and the stream-setting grammar
(:mod:`.settings`), read by table specs, the command line and the engine alike."""
from cemabench.config.fields import (
    DEFAULT_METRICS,
    DEFAULT_TOLERANCE,
    FIELDS,
    LINK_FIELDS,
    TASK_METRICS,
    Protocol,
    check_field,
    check_presets_given,
    override,
    with_link,
)
from cemabench.config.settings import (
    BASES,
    CCC,
    DEVICE_STREAMS,
    GRADUAL_SEVERITIES,
    MIXED,
    SETTINGS,
    describe,
    device_domains,
    parse_setting,
    result_keys,
    severities_needed,
    unit_groups,
)

__all__ = ["BASES", "CCC", "DEFAULT_METRICS", "DEFAULT_TOLERANCE", "DEVICE_STREAMS", "FIELDS", "GRADUAL_SEVERITIES",
           "LINK_FIELDS", "MIXED",
           "SETTINGS", "TASK_METRICS", "Protocol", "check_field", "check_presets_given", "describe", "override",
           "device_domains", "parse_setting", "result_keys", "severities_needed", "unit_groups", "with_link"]
