"""Registers the reference implementations as the ``torch`` backend of every op."""
from . import reference, register

register("attention", "torch", reference.attention)
register("layer_norm", "torch", reference.layer_norm)
register("swiglu", "torch", reference.swiglu)
register("residual_layer_scale", "torch", reference.residual_layer_scale)
register("head_loss", "torch", reference.prototype_loss)
register("centering", "torch", reference.teacher_probs)
