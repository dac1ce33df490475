"""Dilation schedules of the published DiNAT and DiNAT_s recipes, resolved per model depth.

A schedule gives ``dilations[stage][layer]``. Each stage entry is either a fixed list (its length
must equal the stage depth) or a repeating pattern, written ``Repeat(...)``, tiled to the stage
depth (the depth must be a multiple of the pattern length). Sources: SHI-Labs/
Neighborhood-Attention-Transformer ``classification/dinat.py``, ``detection/configs``,
``segmentation/configs`` and ``mask2former/configs``, tabled in docs/original-models.md
section 2 (the largest dilation of a stage is ``floor(side / kernel)`` at the nominal input size
of the recipe); DiNAT_s's (``classification/dinats.py``, ``detection/configs/dinat_s``,
``segmentation/configs/dinat_s``) in section 5.
"""

from collections.abc import Mapping, Sequence
from typing import NamedTuple


class Repeat(NamedTuple):
    """A dilation pattern repeated to fill a stage, e.g. ``Repeat((1, 2))`` -> 1, 2, 1, 2, ..."""

    pattern: tuple[int, ...]


StageSpec = tuple[int, ...] | Repeat

DILATION_SCHEDULES: dict[str, tuple[StageSpec, StageSpec, StageSpec, StageSpec]] = {
    # ImageNet-1k/22k at 224 (kernel 7, also used with kernel 11 for DiNAT-L 11x11).
    'imagenet-224': ((1, 8, 1), (1, 4, 1, 4), Repeat((1, 2)), Repeat((1,))),
    # ImageNet at 384 with kernel 7 (DiNAT-L 384).
    'imagenet-384': ((1, 13, 1), (1, 6, 1, 6), Repeat((1, 3)), Repeat((1,))),
    # COCO Mask R-CNN / Cascade Mask R-CNN.
    'coco': ((1, 28, 1), (1, 7, 1, 14), Repeat((1, 3, 1, 5, 1, 7)), (1, 3, 1, 3, 1)),
    # ADE20K UPerNet, 512x512 crops.
    'ade20k-512': ((1, 16, 1), (1, 4, 1, 8), Repeat((1, 2, 1, 3, 1, 4)), (1, 2, 1, 2, 1)),
    # ADE20K UPerNet DiNAT-L, 640x640 crops (stage 2 is a fixed 18-layer list upstream).
    'ade20k-640': (
        (1, 20, 1),
        (1, 5, 1, 10),
        (1, 2, 1, 3, 1, 4, 1, 5, 1, 2, 1, 3, 1, 4, 1, 5, 1, 5),
        (1, 2, 1, 2, 1),
    ),
    # Mask2Former DiNAT-L, kernel 11 (stage 2 is a fixed 18-layer list upstream).
    'mask2former': (
        (1, 14, 1),
        (1, 4, 1, 7),
        (1, 2, 1, 3, 1, 2, 1, 3, 1, 2, 1, 3, 1, 2, 1, 3, 1, 3),
        Repeat((1,)),
    ),
}

# DiNAT_s (depths 2, 2, 6 | 18, 2): stages 0, 1 and 3 have two layers, the second one dilated
# (to the stage's largest dilation, unlike DiNAT's stage 1); stage 2 as DiNAT's.
DINATS_DILATION_SCHEDULES: dict[str, tuple[StageSpec, StageSpec, StageSpec, StageSpec]] = {
    # ImageNet-1k/22k at 224.
    'imagenet-224': ((1, 8), (1, 4), Repeat((1, 2)), Repeat((1,))),
    # ImageNet at 384 (DiNAT_s-L 384).
    'imagenet-384': ((1, 13), (1, 6), Repeat((1, 3)), Repeat((1,))),
    # COCO Mask R-CNN / Cascade Mask R-CNN.
    'coco': ((1, 28), (1, 14), Repeat((1, 3, 1, 5, 1, 7)), (1, 3)),
    # ADE20K UPerNet, 512x512 crops.
    'ade20k-512': ((1, 16), (1, 8), Repeat((1, 2, 1, 3, 1, 4)), (1, 2)),
    # ADE20K UPerNet DiNAT_s-L "640" (stage 2 is DiNAT-L's fixed 18-layer list).
    'ade20k-640': ((1, 20), (1, 10), DILATION_SCHEDULES['ade20k-640'][2], (1, 2)),
}


def _resolve_stage(name: str, stage: int, spec: StageSpec, depth: int) -> tuple[int, ...]:
    if isinstance(spec, Repeat):
        if depth % len(spec.pattern) != 0:
            raise ValueError(
                f'dilations={name!r}: stage {stage} repeats {spec.pattern}, which does not tile '
                f'depth {depth}; pass explicit dilations for this depth'
            )
        return spec.pattern * (depth // len(spec.pattern))
    if len(spec) != depth:
        raise ValueError(
            f'dilations={name!r}: stage {stage} is defined for depth {len(spec)} only, got '
            f'depth {depth}; pass explicit dilations for this depth'
        )
    return spec


def resolve_dilations(
    dilations: str | Sequence[Sequence[int]] | None,
    depths: Sequence[int],
    schedules: Mapping[str, Sequence[StageSpec]] = DILATION_SCHEDULES,
) -> tuple[tuple[int, ...], ...]:
    """Turns a schedule name, explicit lists or None (all ones) into per-stage, per-layer tuples.

    Args:
        dilations: A key of ``schedules``, one sequence of ints per stage (one int per layer), or
            None for no dilation.
        depths: Number of layers of each stage.
        schedules: The named schedules: :data:`DILATION_SCHEDULES` (NAT / DiNAT) or
            :data:`DINATS_DILATION_SCHEDULES` (DiNAT_s).

    Returns:
        One tuple of dilations per stage, with ``len(result[i]) == depths[i]``.

    Raises:
        ValueError: Unknown name, wrong number of stages or layers, or a dilation < 1.
        TypeError: ``dilations`` is not a str, a sequence of sequences of ints, or None.
    """
    if dilations is None:
        return tuple((1,) * depth for depth in depths)
    if isinstance(dilations, str):
        if dilations not in schedules:
            raise ValueError(
                f'dilations={dilations!r} is not a known schedule; expected one of '
                f'{sorted(schedules)} or explicit per-stage lists'
            )
        schedule = schedules[dilations]
        if len(depths) != len(schedule):
            raise ValueError(
                f'dilations={dilations!r} has {len(schedule)} stages, but depths={tuple(depths)}'
            )
        return tuple(
            _resolve_stage(dilations, i, spec, depth)
            for i, (spec, depth) in enumerate(zip(schedule, depths, strict=True))
        )
    if not isinstance(dilations, Sequence) or not all(
        isinstance(stage, Sequence) for stage in dilations
    ):
        raise TypeError(
            f'dilations must be a schedule name, a sequence of per-stage int sequences or None, '
            f'got {dilations!r}'
        )
    if len(dilations) != len(depths):
        raise ValueError(
            f'dilations has {len(dilations)} stages, expected {len(depths)} '
            f'(one per entry of depths={tuple(depths)})'
        )
    resolved = []
    for i, (stage, depth) in enumerate(zip(dilations, depths, strict=True)):
        if len(stage) != depth:
            raise ValueError(
                f'dilations[{i}]={list(stage)} has {len(stage)} entries, expected the stage '
                f'depth {depth}'
            )
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in stage):
            raise ValueError(f'dilations[{i}]={list(stage)} must contain ints >= 1')
        resolved.append(tuple(stage))
    return tuple(resolved)
