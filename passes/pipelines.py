"""Named pipelines as data: ordered lists of passes bound to their configuration."""

from __future__ import annotations

import functools

from graphpass.api import TransformConfig, register_pipeline
from passes.expand_norm_act import expand_norm_act
from passes.insert_quantize_on_save import insert_quantize_on_save
from passes.replace_batchnorm import replace_batchnorm

__all__ = ["transform_pipeline"]


def transform_pipeline(config: TransformConfig) -> list:
    """What ``gp.transform`` runs: normalization rewrite first (compression then sees the new layers);
    norm-and-activation modules it left are split so that compression sees them as layers."""
    steps: list = []
    if config.norm == "gn+pn":
        steps.append(functools.partial(replace_batchnorm, groups=config.groups))
    if config.bits is not None:
        steps.append(expand_norm_act)
        steps.append(functools.partial(insert_quantize_on_save, bits=config.bits, rounding=config.rounding))
    return steps


register_pipeline("transform", transform_pipeline)
