"""The bottleneck method's config. Its fields are the keys a config string may use."""

from __future__ import annotations

import dataclasses

__all__ = ["INITS", "NONLINEARITIES", "PLACEMENTS", "BottleneckConfig"]

NONLINEARITIES = ("relu", "gelu", "silu", "tanh", "identity")
PLACEMENTS = ("sequential", "parallel")
INITS = ("zeros", "random")


@dataclasses.dataclass
class BottleneckConfig:
    """A bottleneck adapter on each targeted ``Linear``: ``out + scaling * up(act(down(src)))``.

    ``bottleneck[bottleneck_dim=16, target_modules=["fc1"]]`` builds one of these.
    """

    target_modules: list[str] | str | None = None
    """Linear layers to adapt: names matched against the end of each module path
    (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``), or one regular
    expression string matched against the whole path."""

    bottleneck_dim: int = 16
    """Width of the bottleneck (the down-projection's output size)."""

    nonlinearity: str = "relu"
    """Activation between the projections: ``relu``, ``gelu``, ``silu``, ``tanh`` or ``identity``."""

    scaling: float = 1.0
    """Factor applied to the adapter's output before it is added to the layer's output."""

    placement: str = "sequential"
    """``sequential``: the adapter reads the layer's output, ``out + f(out)`` (Houlsby et al.).
    ``parallel``: it reads the layer's input, ``out + f(x)`` (He et al.)."""

    init: str = "zeros"
    """``zeros``: the up-projection starts at zero, so a new adapter leaves the model's
    outputs unchanged until trained. ``random``: both projections keep ``nn.Linear``'s
    default initialisation."""

    dropout: float = 0.0
    """Dropout on the adapter's input, in training mode only."""

    bias: bool = True
    """Whether the two projections have biases."""

    base_model_name_or_path: str | None = None
    """Filled in on save, as in peft's ``adapter_config.json``."""
