"""The descriptor option group without torch: the registry's names and :class:`DescriptorOptions`.

``lit scan --help`` shows the ``--descriptor.*`` options from here before torch is loaded
(:mod:`lit.commands.scan.options`). :data:`DESCRIPTOR_NAMES` is the one list of the descriptors
a user can name: :mod:`models.registry` holds one spec for each, in this order, and refuses to
load otherwise. :class:`models.descriptor_config.DescriptorConfig`, which builds and records the
descriptor, is a :class:`DescriptorOptions` that checks the other fields too (weights, seed,
input size, token normalisation: the checks that need the registry, in one place).
"""

from __future__ import annotations

from dataclasses import dataclass

from lit.choices import TokenNormalization
from lit.errors import UserError

#: The registry's descriptor names, in the order of the paper's Table 1 (pixel baseline last).
DESCRIPTOR_NAMES: tuple[str, ...] = (
    "sscd_resnet50",
    "multigrain_resnet50",
    "vit_s16_in1k",
    "vit_b16_in21k",
    "clip_vit_b16",
    "swin_b_in1k",
    "mocov3_vit_b16",
    "mocov3_vit_b16_cutmix",
    "mocov3",
    "vicregl_resnet50",
    "dino_vit_b16",
    "pixel",
)
#: The descriptor of a scan or config that names none (raw pixels: needs no weights file).
DEFAULT_DESCRIPTOR = "pixel"


@dataclass(frozen=True)
class DescriptorOptions:
    """The fields of a descriptor option; the name is checked against :data:`DESCRIPTOR_NAMES`, the rest
    by :class:`models.descriptor_config.DescriptorConfig` (in the registry's terms).

    Args:
        name: registry name (``models.registry.available_descriptors``).
        weights: local weights file (none for ``pixel``; required by every other descriptor
            unless ``random_init``).
        random_init: random weights instead of a file (tests, floors); recorded, and
            reported under ``<name> (random init)``.
        seed: the random network of ``random_init``: every build with the same seed is the same
            network (built under a forked torch RNG, the global one untouched); recorded and
            compared, so features of two random networks are never searched against each other.
            Only with ``random_init``.
        input_size: override of the descriptor's input resolution.
        token_normalization: normalisation of split-product scores for token descriptors
            (``token``, ``global`` or ``none``; see ``lit.similarity``); ignored by global ones.

    A mistake raises a one-line :class:`lit.errors.UserError` that names the option
    (``descriptor.name: unknown descriptor ...``).
    """

    name: str = DEFAULT_DESCRIPTOR
    weights: str | None = None
    random_init: bool = False
    seed: int = 0
    input_size: int | None = None
    token_normalization: TokenNormalization = "token"

    def __post_init__(self) -> None:
        if self.name not in DESCRIPTOR_NAMES:
            raise UserError(f"descriptor.name: unknown descriptor {self.name!r}; "
                            f"available: {', '.join(DESCRIPTOR_NAMES)}")
