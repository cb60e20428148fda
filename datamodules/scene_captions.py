"""Captions of procedural scenes, made from each scene's own parameters.

A caption names the two largest visible objects of a :class:`datamodules.procedural.Scene`
(size, colour, texture, shape), where the largest lies relative to the second (above, below,
to the left of, to the right of: centres compared, image axes, no flip) and the background
(colour and kind), e.g. ``"a small red striped circle above a large blue star on a dark green
checkered background"``. Colours are named from the parameters' RGB values (hue, saturation,
value buckets; :func:`colour_name`); a background of smooth noise by the mean of its control
colours.

:func:`scene_captions` gives up to :data:`MAX_CAPTIONS` paraphrases of the same facts, the
first of which is the canonical one: the varied-caption mode of controlled duplication and
the several-captions mitigation draw among them. :func:`seed_captions` captions a scene from its
rendering at :data:`CAPTION_SIZE`, so its captions do not depend on the training resolution.
"""

from __future__ import annotations

import colorsys

from torch import Tensor

from datamodules.procedural import BackgroundSpec, ObjectSpec, Scene, draw_scene

_SHAPES = {"disc": "circle", "ellipse": "oval", "rectangle": "rectangle", "triangle": "triangle",
           "star": "star", "ring": "ring"}
_POLYGONS = {5: "pentagon", 6: "hexagon", 7: "heptagon", 8: "octagon"}
_TEXTURES = {"solid": "", "stripes": "striped", "gradient": "shaded", "checker": "checkered", "dots": "dotted"}
_BACKGROUNDS = {"gradient": "gradient", "radial": "radial", "stripes": "striped", "checkerboard": "checkered",
                "noise": "mottled"}
_INVERSE = {"above": "below", "below": "above", "to the left of": "to the right of",
            "to the right of": "to the left of"}
# hue buckets (upper bound in degrees, name); the last wraps back to red
_HUES = ((15, "red"), (45, "orange"), (70, "yellow"), (160, "green"), (200, "teal"), (255, "blue"),
         (290, "purple"), (345, "pink"), (360, "red"))

# {o1}, {o2}: the two objects with their article; {rel}/{inv}: where o1 lies relative to o2 / o2 to o1;
# {bg}: the background with its article, {bgn}: without
_TWO = ("{o1} {rel} {o2} on {bg} background", "{o2} {inv} {o1} on {bg} background",
        "{bg} background with {o1} {rel} {o2}", "a picture of {o1} {rel} {o2}, {bgn} background",
        "{o1} and {o2} on {bg} background, the first {rel} the second",
        "an image of {o2} with {o1} {rel} it on {bg} background", "on {bg} background: {o1} {rel} {o2}",
        "{o1} placed {rel} {o2} over {bg} backdrop")
_ONE = ("{o1} on {bg} background", "{bg} background with {o1}", "a picture of {o1}, {bgn} background",
        "{o1} in front of {bg} background", "an image of {o1} on {bg} backdrop", "on {bg} background: {o1}",
        "{o1} over {bg} backdrop", "{o1} alone on {bg} background")
_NONE = ("{bg} background", "an empty {bgn} background", "a picture of {bg} background",
         "nothing but {bg} background", "an image of {bg} backdrop", "{bg} backdrop", "a plain {bgn} background",
         "{bg} background without shapes")

MAX_CAPTIONS = len(_TWO)
"""How many paraphrases :func:`scene_captions` can make of one scene."""

CAPTION_SIZE = 64
"""Side a scene is rendered at to caption it (which objects are visible and largest), whatever size
its training image has, so that a scene has the same captions at every resolution."""


def colour_name(rgb: Tensor | tuple[float, float, float]) -> str:
    """A name for an RGB colour in [0, 1]: black, gray or white when dark or unsaturated, else a hue
    (red, orange, yellow, green, teal, blue, purple, pink), ``dark`` in front when dim (dark orange
    is brown)."""
    red, green, blue = (float(v) for v in rgb)
    hue, saturation, value = colorsys.rgb_to_hsv(red, green, blue)
    if value < 0.2:
        return "black"
    if saturation < 0.25:
        return "white" if value > 0.8 else "gray"
    name = next(label for bound, label in _HUES if hue * 360.0 < bound)
    if value < 0.5:
        return "brown" if name == "orange" else f"dark {name}"
    return name


def object_phrase(spec: ObjectSpec) -> str:
    """``"small red striped circle"``: size (radius under 0.14 small, over 0.2 large), colour,
    texture and shape of one object, without an article."""
    size = "small" if spec.radius < 0.14 else "large" if spec.radius > 0.2 else ""
    shape = _POLYGONS[spec.corners] if spec.shape == "polygon" else _SHAPES[spec.shape]
    return _join(size, colour_name(spec.first), _TEXTURES[spec.texture], shape)


def background_phrase(spec: BackgroundSpec) -> str:
    """``"dark green checkered"``: the background's colour and kind, without an article."""
    colour = spec.noise.mean(dim=(1, 2)) if spec.kind == "noise" else spec.first
    return _join(colour_name(colour), _BACKGROUNDS[spec.kind])


def relation(first: ObjectSpec, second: ObjectSpec) -> str:
    """Where ``first`` lies relative to ``second``: along the axis on which their centres differ most."""
    dx = second.centre[0] - first.centre[0]
    dy = second.centre[1] - first.centre[1]  # image rows grow downwards
    if abs(dy) >= abs(dx):
        return "above" if dy > 0 else "below"
    return "to the left of" if dx > 0 else "to the right of"


def seed_captions(seed: int, count: int = 1, num_objects: tuple[int, int] = (2, 5)) -> list[str]:
    """:func:`scene_captions` of scene ``seed`` rendered at :data:`CAPTION_SIZE`."""
    return scene_captions(draw_scene(seed, CAPTION_SIZE, num_objects), count)


def scene_captions(scene: Scene, count: int = 1) -> list[str]:
    """``count`` (at most :data:`MAX_CAPTIONS`) distinct paraphrases describing ``scene``; the first
    is the canonical caption."""
    if not 1 <= count <= MAX_CAPTIONS:
        raise ValueError(f"count must be in 1..{MAX_CAPTIONS}, got {count}")
    largest = sorted(range(len(scene.objects)), key=lambda k: (-scene.areas[k], k))[:2]
    objects = [scene.objects[k] for k in largest]
    bare = background_phrase(scene.background)
    fields = {"bg": _with_article(bare), "bgn": bare}
    templates = _NONE
    if objects:
        fields["o1"] = _with_article(object_phrase(objects[0]))
        templates = _ONE
    if len(objects) == 2:
        fields.update(o2=_with_article(object_phrase(objects[1])), rel=relation(objects[0], objects[1]))
        fields["inv"] = _INVERSE[fields["rel"]]
        templates = _TWO
    return [template.format(**fields) for template in templates[:count]]


def _join(*parts: str) -> str:
    return " ".join(part for part in parts if part)


def _with_article(phrase: str) -> str:
    return f"{'an' if phrase[:1] in 'aeiou' else 'a'} {phrase}"


__all__ = ["CAPTION_SIZE", "MAX_CAPTIONS", "background_phrase", "colour_name", "object_phrase", "relation",
           "scene_captions", "seed_captions"]
