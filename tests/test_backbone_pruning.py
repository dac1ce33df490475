"""out_indices that end before the last stage: the later stages are not built (no unused
parameters under DDP), and a full checkpoint still loads strictly."""

import logging

import pytest
import torch
import torch.distributed as dist
from torch import nn

import nat_mm.checkpoint.strict as strict_module
from nat_mm.errors import NatMMError
from nat_mm.models import NAT, DiNAT

TINY = dict(
    arch=None,
    embed_dim=8,
    depths=(1, 1, 2, 1),
    num_heads=(1, 1, 2, 2),
    mlp_ratio=1.0,
    kernel_size=3,
    drop_path_rate=0.0,
)
TINY_DILATIONS = [[2], [1], [1, 2], [1]]


def build(cls=NAT, **overrides):
    cfg = dict(TINY, dilations=TINY_DILATIONS if cls is DiNAT else None)
    cfg.update(overrides)
    return cls(**cfg)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize('cls', [NAT, DiNAT])
@pytest.mark.parametrize('out_indices', [(0, 1, 2), (1,), (0, 2)])
def test_only_the_stages_up_to_the_last_out_index_are_built(cls, out_indices):
    full, pruned = build(cls), build(cls, out_indices=out_indices)
    last = out_indices[-1]
    kept = [full.patch_embed, *full.levels[:last], full.levels[last].blocks]
    kept += [getattr(full, f'norm{i}') for i in out_indices]
    assert count(pruned) == sum(count(module) for module in kept) < count(full)
    assert len(pruned.levels) == last + 1 and pruned.levels[last].downsample is None
    assert not any(hasattr(pruned, f'norm{i}') for i in range(last + 1, 4))
    assert pruned.out_channels == tuple(8 * 2**i for i in out_indices)
    assert pruned.strides == tuple(4 * 2**i for i in out_indices)


@pytest.mark.parametrize('cls', [NAT, DiNAT])
def test_the_pruned_backbone_gives_the_full_ones_maps(cls):
    full = build(cls).eval()
    pruned = build(cls, out_indices=(0, 1, 2)).eval()
    pruned.load_state_dict({k: v for k, v in full.state_dict().items() if k in pruned.state_dict()})
    image = torch.randn(1, 3, 40, 36)
    with torch.no_grad():
        for got, expected in zip(pruned(image), full(image)[:3], strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize('cls', [NAT, DiNAT])
def test_every_parameter_gets_a_gradient(cls):
    model = build(cls, out_indices=(0, 1, 2)).train()
    sum(out.square().mean() for out in model(torch.randn(2, 3, 32, 32))).backward()
    without = [name for name, p in model.named_parameters() if p.grad is None]
    assert not without


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group, as under torchrun with one GPU."""
    store = dist.FileStore(str(tmp_path / 'store'), 1)
    dist.init_process_group('gloo', store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def ddp_steps(model: nn.Module, steps: int = 2) -> None:
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
    for _ in range(steps):  # DDP finds parameters without gradient at the next step
        optimizer.zero_grad()
        sum(out.square().mean() for out in ddp(torch.randn(2, 3, 32, 32))).backward()
        optimizer.step()


@pytest.mark.parametrize('cls', [NAT, DiNAT])
def test_ddp_without_find_unused_parameters_trains(cls, process_group):
    model = build(cls, out_indices=(0, 1, 2)).train()
    before = model.levels[2].blocks[0].mlp.fc1.weight.detach().clone()
    ddp_steps(model)
    assert not torch.equal(model.levels[2].blocks[0].mlp.fc1.weight, before)


def test_ddp_rejects_a_parameter_without_gradient(process_group):
    # The check above can fail: an unused parameter (as a stage after the last out index was).
    model = build(out_indices=(0, 1, 2)).train()
    model.unused = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match=r'unused parameters|finished reduction'):
        ddp_steps(model)


def test_frozen_stages_freeze_the_built_stages():
    with pytest.raises(ValueError, match=r'frozen_stages=5 must be in -1\.\.4'):
        build(out_indices=(0, 1), frozen_stages=5)
    for frozen_stages in (2, 3, 4):
        model = build(out_indices=(0, 1, 2), frozen_stages=frozen_stages).train()
        frozen = ('patch_embed.', *(f'levels.{i}.' for i in range(frozen_stages)))
        frozen += tuple(f'norm{i}.' for i in range(frozen_stages))
        for name, param in model.named_parameters():
            assert param.requires_grad == (not name.startswith(frozen)), (frozen_stages, name)
        assert model.levels[2].training == (frozen_stages == 2)


@pytest.fixture
def full_checkpoint(tmp_path):
    """A full NAT's weights in the mmdet layout (with a neck), and the NAT."""
    full = build()
    state_dict = {f'backbone.{k}': v for k, v in full.state_dict().items()}
    state_dict['neck.lateral_convs.0.conv.weight'] = torch.zeros(4, 8, 1, 1)
    path = tmp_path / 'full.pth'
    torch.save({'state_dict': state_dict}, path)
    return str(path), full


def test_a_full_checkpoint_loads_strictly_and_the_dropped_keys_are_logged(
    full_checkpoint, monkeypatch
):
    path, full = full_checkpoint
    log = []
    monkeypatch.setattr(
        strict_module, 'print_log', lambda message, logger, level=logging.INFO: log.append(message)
    )
    pruned = build(out_indices=(0, 1, 2), init_cfg=dict(type='Pretrained', checkpoint=path))
    pruned.init_weights()
    weights = full.state_dict()
    for key, value in pruned.state_dict().items():
        assert torch.equal(value, weights[key]), key
    dropped = sorted(set(weights) - set(pruned.state_dict()))
    assert dropped and all(
        key.startswith(('levels.3.', 'levels.2.downsample.', 'norm3.')) for key in dropped
    )
    (message,) = [m for m in log if 'does not build' in m]
    assert all(repr(key) in message for key in dropped)
    assert 'levels.3.*' in message and 'levels.2.downsample.*' in message


@pytest.mark.parametrize(
    ('edit', 'error'),
    [
        ('delete', r'1 missing keys: levels\.2\.blocks\.1\.attn\.qkv\.weight'),
        ('add', r'1 unexpected keys: levels\.1\.blocks\.0\.attn\.extra'),
    ],
)
def test_other_key_differences_still_fail(tmp_path, full_checkpoint, edit, error):
    path, _ = full_checkpoint
    checkpoint = torch.load(path)
    if edit == 'delete':
        del checkpoint['state_dict']['backbone.levels.2.blocks.1.attn.qkv.weight']
    else:
        checkpoint['state_dict']['backbone.levels.1.blocks.0.attn.extra'] = torch.zeros(1)
    torch.save(checkpoint, path)
    pruned = build(out_indices=(0, 1, 2), init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(NatMMError, match=error):
        pruned.init_weights()
