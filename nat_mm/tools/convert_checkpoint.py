"""Convert NAT / DiNAT checkpoints between the original, mmdet/mmseg and HuggingFace layouts.

The source layout is detected automatically (original flat or under ``model``/``state_dict``,
``backbone.``-prefixed downstream checkpoints, HuggingFace ``nat.``/``dinat.`` files or folders,
URLs). Converting a downstream checkpoint to a backbone layout keeps the backbone only;
``--to mmdet3`` / ``--to mmseg1`` write a whole detector / segmentor as mmdet 3.x / mmseg 1.x
save one (from upstream's mmdet 2.x / mmseg 0.x or detectron2 Mask2Former files: the state dict
in the host's layout, the class names as ``meta['dataset_meta']``, no optimizer). Examples::

    python tools/convert_checkpoint.py dinat_tiny_in1k_224.pth dinat_tiny_hf/ --to huggingface \\
        --hf-prefix dinat
    python tools/convert_checkpoint.py hf_folder/ nat_mini.pth --to original
    python tools/convert_checkpoint.py mask_rcnn_nat_mini.pth backbone.pth --to original
    python tools/convert_checkpoint.py mask_rcnn_nat_mini.pth mask_rcnn_nat_mini_mmdet3.pth \\
        --to mmdet3
"""

from __future__ import annotations

import argparse
import sys

from nat_mm.checkpoint import FORMATS, MODEL_FORMATS, convert_checkpoint_file
from nat_mm.tools.cli import add_force, add_sha256, add_trust, run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('source', help='checkpoint file, HuggingFace folder or http(s) URL')
    parser.add_argument(
        'destination',
        help='output file (.pth, .bin, .safetensors) or folder (gets model.safetensors)',
    )
    parser.add_argument(
        '--to',
        required=True,
        choices=FORMATS + MODEL_FORMATS,
        help='layout to write: a backbone (original, mmdet, huggingface) or a whole model '
        '(mmdet3, mmseg1)',
    )
    parser.add_argument(
        '--hf-prefix',
        default='nat',
        help="HuggingFace model prefix for --to huggingface: 'nat' (default), 'dinat', or '' for "
        'the NatBackbone / NatModel layout',
    )
    add_trust(parser)
    add_sha256(parser)
    add_force(parser, 'an existing output file')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def convert() -> None:
        written, source_format, dropped = convert_checkpoint_file(
            args.source, args.destination, args.to, args.hf_prefix, args.force,
            args.trust_checkpoint, args.sha256,
        )  # fmt: skip
        if dropped and args.to in MODEL_FORMATS:
            print(f'dropped the training state of the {source_format} checkpoint: {dropped}')
        elif dropped:
            print(f'dropped {len(dropped)} non-backbone keys of the {source_format} checkpoint')
        print(f'converted {args.source} ({source_format}) -> {written} ({args.to})')

    return run(convert)


if __name__ == '__main__':
    sys.exit(main())
