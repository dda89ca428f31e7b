"""Typed configuration: YAML in, ``--set a.b=v`` overrides, errors before any work starts.

Every section is a dataclass (:mod:`.sections`); the string under each field is its documentation, a
choice is a ``Literal``, and the section's checks sit beside its fields. :mod:`.loading` reads YAML
strictly (:mod:`.yaml_io`: duplicate keys fail), applies overrides and validates. Components take the
sections they use (the model its ``ModelConfig`` and ``HeadConfig``, the data loader its ``DataConfig``,
the losses ``LossConfig``, parallelize ``ParallelConfig``); the few that join sections (the schedules,
the run itself) take the whole :class:`Config`. Derived values (scaled lr, step counts, token counts) are
computed once by :func:`derive` as a :class:`Derived` record and saved with the run
(``resolved_config.yaml``).
"""
from .loading import (
                      Derived,
                      build_section,
                      derive,
                      describe,
                      load_config,
                      parse_override,
                      resolve_config_path,
                      save_resolved,
                      shipped_configs,
                      to_dict,
                      validate,
)
from .sections import (
                      Config,
                      ConfigError,
                      CropConfig,
                      DataConfig,
                      EvalConfig,
                      HeadConfig,
                      LossConfig,
                      MaskConfig,
                      ModelConfig,
                      OpsConfig,
                      OptimConfig,
                      ParallelConfig,
                      TrainConfig,
)

__all__ = ["Config", "ConfigError", "CropConfig", "DataConfig", "Derived", "EvalConfig", "HeadConfig", "LossConfig",
           "MaskConfig", "ModelConfig", "OpsConfig", "OptimConfig", "ParallelConfig", "TrainConfig", "build_section",
           "derive", "describe", "load_config", "parse_override", "resolve_config_path", "save_resolved",
           "shipped_configs", "to_dict", "validate"]
