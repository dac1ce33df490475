"""Export a NAT / DiNAT backbone, or an mmdet / mmseg model's network, to ONNX or to a
`torch.export` ExportedProgram, and check the file against eager PyTorch.

What is exported:
- a backbone preset (``nat-tiny``, ...): its four NCHW feature maps;
- a config: the model in tensor mode (mmseg's segmentors, mmdet's single-stage detectors: the
  raw head outputs, as ``model(x, mode='tensor')``; decoding, NMS and resizing stay with the
  user), or with ``features=True`` the backbone and neck (``extract_feat``). A two-stage
  detector (Faster / Mask R-CNN) exports whole: its tensor mode and its proposals, the RPN's NMS
  and RoIAlign included (`nat_mm.apis.export_two_stage`); Cascade takes ``features=True``.

Neighborhood attention is one operator (`nat_mm.ops.library`): an ExportedProgram keeps it (and
needs ``import nat_mm`` to load), ONNX gets its gather form, standard operators only
(`nat_mm.ops.export`).
"""

from __future__ import annotations

import os
import pathlib
import tempfile
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from nat_mm.errors import NatMMError

FORMATS = ('onnx', 'exported-program')


class TensorMode(nn.Module):
    """An mmdet / mmseg model's network from an image batch: tensor mode, or the backbone and
    neck (`features`), its outputs flattened into a tuple of tensors."""

    def __init__(self, model: nn.Module, features: bool) -> None:
        super().__init__()
        self.model = model
        self.features = features

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.features:
            outputs = self.model.extract_feat(image)
        else:
            outputs = self.model(image, None, mode='tensor')
        return tuple(torch.utils._pytree.tree_leaves(outputs))


def build_network(
    config: str | None = None,
    checkpoint: str | None = None,
    backbone: str | None = None,
    features: bool = False,
    cfg_options: dict | None = None,
    trust: bool = False,
) -> tuple[nn.Module, str]:
    """The network to export, in eval mode, and its name.

    Args:
        config: An mmdet / mmseg config (or None with `backbone`).
        checkpoint: Weights to load strictly (None: random initialisation).
        backbone: A preset of `nat_mm.apis.backbone_presets` instead of a config.
        features: A config's backbone and neck rather than its tensor mode.
        cfg_options: Config overrides.
        trust: Unpickle an old checkpoint you trust (see `nat_mm.checkpoint`).

    Raises:
        NatMMError: Neither or both of config and backbone; a two-stage detector that
            `TwoStageTensorMode` does not follow (Cascade: use `features`); a bad config, preset
            or checkpoint.
    """
    from nat_mm.apis.config import build_backbone, build_model, load_config
    from nat_mm.checkpoint import load_backbone_checkpoint, load_model_checkpoint

    if (config is None) == (backbone is None):
        raise NatMMError('give a config or --backbone PRESET (one of them)', 'config')
    if backbone is not None:
        network = build_backbone(backbone)
        if checkpoint is not None:
            load_backbone_checkpoint(network, checkpoint, trust=trust)
        return network.eval(), backbone
    cfg = load_config(config, cfg_options)
    cfg.model.backbone.init_cfg = None  # the checkpoint (or nothing) gives the weights
    model = build_model(cfg)
    if checkpoint is not None:
        load_model_checkpoint(model, checkpoint, trust=trust)
    name = pathlib.Path(config).stem + (' (backbone + neck)' if features else ' (tensor mode)')
    if not features and 'roi_head' in cfg.model:
        # mmdet's tensor mode runs the RPN's NMS and RoIAlign: nat_mm's exportable version.
        from nat_mm.apis.export_two_stage import TwoStageTensorMode

        return TwoStageTensorMode(model.eval()).eval(), name + ' + proposals'
    return TensorMode(model, features).eval(), name


def export_program(
    network: nn.Module, shape: tuple[int, int], dynamic: bool
) -> tuple[torch.export.ExportedProgram, bool]:
    """`torch.export` of `network` on a 1 x 3 x H x W input.

    Args:
        network: From `build_network`.
        shape: (H, W) of the example input.
        dynamic: Ask for symbolic H and W.

    Returns:
        The program, and whether H and W stayed symbolic (the exporter may fix a size the
        network specializes on; the program then holds at `shape` only).
    """
    image = torch.randn(1, 3, *shape)
    dynamic_shapes = ({2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO},) if dynamic else None
    with torch.no_grad():
        program = torch.export.export(network, (image,), dynamic_shapes=dynamic_shapes)
    image_name = program.graph_signature.user_inputs[0]
    image_node = next(node for node in program.graph.nodes if node.name == image_name)
    symbolic = all(isinstance(size, torch.SymInt) for size in image_node.meta['val'].shape[2:])
    return program, symbolic


def save_program(
    program: torch.export.ExportedProgram, out: str | os.PathLike, file_format: str, force: bool
) -> None:
    """Write `program` as ONNX (standard operators) or as a `.pt2` ExportedProgram."""
    if file_format not in FORMATS:
        raise NatMMError(f'format must be one of {list(FORMATS)}, got {file_format!r}', '--format')
    out = pathlib.Path(out)
    if out.exists() and not force:
        raise NatMMError('the output exists; pass --force to overwrite it', out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if file_format == 'onnx':
        from nat_mm.ops.export import to_onnx

        to_onnx(program, out)
    else:
        torch.export.save(program, out)


def load_runner(path: str | os.PathLike, file_format: str) -> Callable[[torch.Tensor], list]:
    """A function running the exported file on an image (onnxruntime for ONNX, on CPU)."""
    if file_format == 'onnx':
        try:
            import onnxruntime
        except ImportError as error:
            raise NatMMError(
                "checking an ONNX file needs onnxruntime: pip install 'nat_mm[export]'", path
            ) from error
        session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
        name = session.get_inputs()[0].name

        def run_onnx(image: torch.Tensor) -> list:
            return [torch.from_numpy(out) for out in session.run(None, {name: image.numpy()})]

        return run_onnx
    from nat_mm.ops import detection  # noqa: F401  (a two-stage program's nms / roi_align)

    module = torch.export.load(path).module()

    def run_program(image: torch.Tensor) -> list:
        with torch.no_grad():
            return list(module(image))

    return run_program


def median_latency(function: Callable[[], object], repeats: int) -> float:
    """Median wall time of `function()` in milliseconds, after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def compare(network: nn.Module, run: Callable, image: torch.Tensor) -> tuple[float, float]:
    """Max absolute and max relative error (to each output's largest value) of `run` vs eager.

    Outputs compare one by one and must have eager's shapes: a count that depends on the data (a
    two-stage detector's proposals, and the head outputs of each) must be eager's count. A
    network with `align_outputs` (`TwoStageTensorMode`) first pairs the file's rows with eager's
    (proposals of nearly equal score may come in another order).
    """
    with torch.no_grad():
        expected = list(network(image))
    outputs = run(image)
    if len(outputs) != len(expected):
        raise NatMMError(f'the file gives {len(outputs)} outputs, eager {len(expected)}', 'out')
    for index, (out, want) in enumerate(zip(outputs, expected, strict=True)):
        if out.shape != want.shape:
            raise NatMMError(
                f'output {index} of the file has shape {list(out.shape)}, eager '
                f'{list(want.shape)} (a different number of proposals?)',
                'out',
            )
    align = getattr(network, 'align_outputs', None)
    if align is not None:  # rows in a data-dependent order (TwoStageTensorMode's proposals)
        outputs, expected = align(outputs, expected)
    abs_error = rel_error = 0.0
    for out, want in zip(outputs, expected, strict=True):
        error = float((out - want).abs().max()) if want.numel() else 0.0
        abs_error = max(abs_error, error)
        rel_error = max(rel_error, error / max(float(want.abs().max()), 1e-30))
    return abs_error, rel_error


def export_and_check(
    network: nn.Module,
    name: str,
    shape: tuple[int, int],
    out: str | os.PathLike,
    file_format: str = 'onnx',
    dynamic: bool = False,
    force: bool = False,
    repeats: int = 5,
    peer: nn.Module | None = None,
) -> dict:
    """Export `network`, check the file on a random input, time eager and the runtime.

    Args:
        network, name: From `build_network`.
        shape: (H, W).
        out: The file to write.
        file_format: 'onnx' or 'exported-program'.
        dynamic: Symbolic H and W (checked at `shape` and at a second size when they stay
            symbolic).
        force: Overwrite `out`.
        repeats: Timed runs per latency (median).
        peer: A network exported and timed the same way for comparison (Swin-T), or None.

    Returns:
        {'rows': [{'name', 'runtime', 'eager_ms', 'runtime_ms', 'max_abs', 'max_rel',
        'sizes'}], 'dynamic': whether H and W stayed symbolic, 'out': the path}.
    """
    if len(shape) != 2 or min(shape) < 1:
        raise NatMMError(f'shape must be H W >= 1, got {list(shape)}', '--shape')
    if repeats < 1:
        raise NatMMError(f'repeats must be >= 1, got {repeats}', '--repeats')
    if pathlib.Path(out).exists() and not force:
        raise NatMMError('the output exists; pass --force to overwrite it', out)
    program, symbolic = export_program(network, shape, dynamic)
    save_program(program, out, file_format, force)
    rows = [_check_row(network, name, out, file_format, shape, symbolic, repeats)]
    if peer is not None:
        with tempfile.TemporaryDirectory() as scratch:
            suffix = '.onnx' if file_format == 'onnx' else '.pt2'
            peer_out = pathlib.Path(scratch) / f'peer{suffix}'
            peer_program, _ = export_program(peer, shape, dynamic=False)
            save_program(peer_program, peer_out, file_format, force=True)
            rows.append(_check_row(peer, 'Swin-T', peer_out, file_format, shape, False, repeats))
    return {'rows': rows, 'dynamic': symbolic, 'out': str(out)}


def _check_row(
    network: nn.Module,
    name: str,
    path: str | os.PathLike,
    file_format: str,
    shape: tuple[int, int],
    symbolic: bool,
    repeats: int,
) -> dict:
    run = load_runner(path, file_format)
    sizes: Sequence[tuple[int, int]] = [shape]
    if symbolic:  # and a second size, to show the file holds elsewhere too
        sizes = [shape, (shape[0] + 32, max(shape[1] - 32, 33))]
    abs_error = rel_error = 0.0
    for size in sizes:
        errors = compare(network, run, torch.randn(1, 3, *size))
        abs_error, rel_error = max(abs_error, errors[0]), max(rel_error, errors[1])
    image = torch.randn(1, 3, *shape)

    def eager() -> None:
        with torch.no_grad():
            network(image)

    return {
        'name': name,
        'runtime': 'onnxruntime' if file_format == 'onnx' else 'ExportedProgram',
        'eager_ms': median_latency(eager, repeats),
        'runtime_ms': median_latency(lambda: run(image), repeats),
        'max_abs': abs_error,
        'max_rel': rel_error,
        'sizes': list(sizes),
    }
