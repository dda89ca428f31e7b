"""Student and teacher, built whole on one process or sharded from the meta device under FSDP2.

Under FSDP2 no rank ever holds the whole model: the networks are built on the meta device (shapes
only), sharded by :func:`~virchow_fast.train.parallelize.parallelize`, given empty storage for their
own shards, and initialised there. :mod:`virchow_fast.model.init` draws each parameter from its own
seeded generator, so the shards hold exactly the values a whole build with the same seed has; a
``model.init_from`` file is then read whole on each rank (on the CPU) and each rank copies only its
shard; the teacher copies the student shard by shard. Without FSDP the networks are built whole on
the device, the same way.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..config import Config, ParallelConfig
from ..model.init import copy_parameters, init_parameters
from ..model.ssl import SSLNetwork, make_teacher
from .parallelize import parallelize, use_fsdp

log = logging.getLogger("virchow_fast.train")


def _init_from(student: nn.Module, path: str, is_main: bool) -> None:
    from ..downstream.pretrained import init_student

    summary = init_student(student, path)
    if is_main:
        log.info("%s", summary)


def build_networks(cfg: Config, info, parallel: ParallelConfig | None = None) -> tuple[nn.Module, nn.Module]:
    """(student, teacher) on ``info.device``, parallelized per ``parallel`` (default ``cfg.parallel``)."""
    parallel = parallel or cfg.parallel
    seed = cfg.train.seed
    sharded = use_fsdp(parallel, info)
    with torch.device("meta" if sharded else info.device):
        student = SSLNetwork(cfg.model, cfg.heads, seed=seed)
    if not sharded:
        if cfg.model.init_from:
            _init_from(student, cfg.model.init_from, info.is_main)
        teacher = make_teacher(student)
        return parallelize(student, teacher, parallel, info)
    teacher = make_teacher(student)
    student, teacher = parallelize(student, teacher, parallel, info)
    for net in (student, teacher):
        net.to_empty(device=info.device)
    init_parameters(student, seed)
    if cfg.model.init_from:
        _init_from(student, cfg.model.init_from, info.is_main)
    copy_parameters(teacher, student)
    return student, teacher
