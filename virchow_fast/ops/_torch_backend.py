"""Registers the reference implementations as the ``torch`` backend of every op.

The eager head loss takes its teacher targets through ``ops.teacher_probs``, so the ``centering``
op's backend (the CUDA kernels when built) serves it.
"""
import functools

from . import reference, register, teacher_probs

register("attention", "torch", reference.attention)
register("layer_norm", "torch", reference.layer_norm)
register("swiglu", "torch", reference.swiglu)
register("residual_layer_scale", "torch", reference.residual_layer_scale)
register("head_loss", "torch", functools.partial(reference.prototype_loss, targets=teacher_probs))
register("centering", "torch", reference.teacher_probs)
