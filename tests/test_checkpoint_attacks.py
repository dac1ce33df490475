"""Hostile checkpoints written by someone who has read nat_mm/checkpoint/: they must not work.

The pickles here are written by hand, opcode by opcode, using only the globals the safe loader
accepts (``allowed_global_names()``): the two attacks that broke the old loader, then, for every
accepted global, calls and object creations with hostile arguments, pickle's BUILD with dict and
slot state on the class object and on an instance, ``getattr`` with every name but the fixed
statistics, two-file (poison, then exploit) sequences, legacy and zip files, protocols 2-5 and
persistent ids other than storages. Each case asserts: refused (a NatMMError naming the file) or
harmless (only plain data came back), no marker file and no file created anywhere under a watched
folder, every accepted class's and module's ``__dict__`` unchanged, torch's safe-globals list
unchanged, and a benign checkpoint still loading afterwards.
"""

from __future__ import annotations

import argparse
import builtins
import codecs
import collections
import datetime
import os
import pathlib
import pickle
import struct
import types
from collections.abc import Callable
from typing import Any

import mmengine.logging.history_buffer
import numpy as np
import pytest
import torch
import torch._utils
import torch._weights_only_unpickler
import torch.serialization
from mmengine.logging import HistoryBuffer, MessageHub

import nat_mm.checkpoint.reading
import nat_mm.checkpoint.unpickling
from nat_mm.checkpoint import UnsafeCheckpointError, allowed_global_names, load_checkpoint
from nat_mm.checkpoint.unpickling import EXTRA_GLOBALS, HISTORY_BUFFER_STATISTICS
from nat_mm.errors import NatMMError

# ----------------------------------------------------------------------------- writing pickles


class Op:
    """Hand-written protocol-2 pickle fragments; each expression pushes exactly one object."""

    NONE = b'N'
    TRUE = b'\x88'

    @staticmethod
    def glob(full_name: str) -> bytes:
        module, name = full_name.rsplit('.', 1)
        return b'c' + module.encode() + b'\n' + name.encode() + b'\n'

    @staticmethod
    def str(text: str) -> bytes:
        data = text.encode('utf-8', 'surrogatepass')
        return b'X' + struct.pack('<I', len(data)) + data

    @staticmethod
    def int(value: int) -> bytes:
        return b'J' + struct.pack('<i', value)

    @staticmethod
    def tuple(*items: bytes) -> bytes:
        return b'(' + b''.join(items) + b't'

    @staticmethod
    def dict(**items: bytes) -> bytes:
        return Op.dict_of([(Op.str(k), v) for k, v in items.items()])

    @staticmethod
    def dict_of(pairs: list[tuple[bytes, bytes]]) -> bytes:
        return b'}' + (b'(' + b''.join(k + v for k, v in pairs) + b'u' if pairs else b'')

    @staticmethod
    def list(*items: bytes) -> bytes:
        return b']' + (b'(' + b''.join(items) + b'e' if items else b'')

    @staticmethod
    def call(func: bytes, *args: bytes) -> bytes:  # REDUCE
        return func + Op.tuple(*args) + b'R'

    @staticmethod
    def new(cls: bytes, *args: bytes) -> bytes:  # NEWOBJ
        return cls + Op.tuple(*args) + b'\x81'

    @staticmethod
    def build(obj: bytes, state: bytes) -> bytes:  # BUILD
        return obj + state + b'b'

    @staticmethod
    def put(index: int, obj: bytes) -> bytes:  # the object stays on the stack, memoized
        return obj + b'q' + bytes([index])

    @staticmethod
    def get(index: int) -> bytes:
        return b'h' + bytes([index])

    @staticmethod
    def persistent(pid: bytes) -> bytes:  # BINPERSID
        return pid + b'Q'

    @staticmethod
    def program(obj: bytes, protocol: int = 2) -> bytes:
        return b'\x80' + bytes([protocol]) + obj + b'.'


def write_zip(path: pathlib.Path, program: bytes, records: dict[str, bytes] | None = None) -> str:
    """A zip-format torch file whose data.pkl is ``program`` (what torch.save writes around it)."""
    writer = torch._C.PyTorchFileWriter(str(path))
    for name, data in {'data.pkl': program, 'byteorder': b'little', **(records or {})}.items():
        writer.write_record(name, data, len(data))
    writer.write_end_of_file()
    return str(path)


def write_legacy(path: pathlib.Path, program: bytes) -> str:
    """A legacy (non-zip) torch file: magic number, protocol, system info, the object."""
    with open(path, 'wb') as file:
        for header in (0x1950A86A20F9469CFC6C, 1001, {'protocol_version': 1001}):
            pickle.dump(header, file, protocol=2)
        file.write(program)
        pickle.dump([], file, protocol=2)
    return str(path)


def eval_payload(marker: pathlib.Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


# ----------------------------------------------------------------------------- what must not change


def _watched_objects() -> dict[str, Any]:
    """Each class, function, module an accepted global names, and the real classes behind ours."""
    from torch._weights_only_unpickler import _get_allowed_globals

    objects: dict[str, Any] = dict(_get_allowed_globals())
    objects.update({f'stand-in {name}': obj for obj, name in EXTRA_GLOBALS})
    objects.update(
        {
            'HistoryBuffer': HistoryBuffer,
            'argparse.Namespace': argparse.Namespace,
            'numpy.ndarray': np.ndarray,
            'numpy.dtype': np.dtype,
            'numpy.float64 dtype class': type(np.dtype('f8')),
            'collections.deque': collections.deque,
        }
    )
    for module in (
        argparse,
        builtins,
        codecs,
        collections,
        np,
        mmengine.logging.history_buffer,
        torch._utils,
        torch.serialization,
        torch._weights_only_unpickler,
        nat_mm.checkpoint.reading,
        nat_mm.checkpoint.unpickling,
    ):
        objects[f'module {module.__name__}'] = module
    return objects


def _shallow(value: Any) -> Any:
    """Identity of a value, and of the items of a mutable container (a class-level dict, say)."""
    if type(value) in (dict, collections.OrderedDict):
        return id(value), tuple((k, id(v)) for k, v in value.items())
    if type(value) in (list, set):
        return id(value), tuple(sorted(map(id, value)))
    return id(value)


def snapshot_state() -> dict[str, Any]:
    state: dict[str, Any] = {}
    for label, obj in _watched_objects().items():
        namespace = getattr(obj, '__dict__', None)
        if isinstance(namespace, (dict, types.MappingProxyType)):
            # torch rebinds its safe-globals set on every change: compared by content below
            skip = ('__doc__', '_marked_safe_globals_set', '__warningregistry__')
            state[label] = {k: _shallow(v) for k, v in namespace.items() if k not in skip}
    state['HistoryBuffer statistics'] = dict(HistoryBuffer._statistics_methods)
    state['float64'] = (np.dtype('f8').byteorder, np.dtype('f8').str, np.dtype('f8').descr)
    state['safe globals'] = set(torch.serialization.get_safe_globals())
    return state


def files_under(folder: pathlib.Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob('*')}


PLAIN_TYPES = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    bytearray,
    torch.Tensor,
    torch.Size,
    torch.device,
    torch.dtype,
    torch.UntypedStorage,
    torch.storage.TypedStorage,
    np.ndarray,
    np.generic,
    np.dtype,
    HistoryBuffer,
    argparse.Namespace,
)


def assert_plain_data(obj: Any, seen: set[int] | None = None) -> None:
    """What a harmless load returns: containers of data, or torch's own default globals."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, (list, tuple, set, frozenset)):
        for item in obj:
            assert_plain_data(item, seen)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            assert_plain_data(key, seen)
            assert_plain_data(value, seen)
    elif not isinstance(obj, PLAIN_TYPES):
        from torch._weights_only_unpickler import _get_allowed_globals

        defaults = [*_get_allowed_globals().values(), frozenset]
        assert any(obj is default for default in defaults), f'a load returned {obj!r}'


# ----------------------------------------------------------------------------- fixtures


def benign_checkpoint() -> dict:
    """What a real mmengine run / timm run checkpoint holds, in small."""
    hub = MessageHub.get_instance('nat_mm_attack_suite_benign')
    for value in (1.0, 0.5, 0.25):
        hub.update_scalar('train/loss', value)
    hub.update_info('iter', 3)
    return {
        'meta': {'epoch': 1, 'iter': 3, 'seed': np.int64(7), 'dataset_meta': {'classes': ('a',)}},
        'state_dict': collections.OrderedDict(weight=torch.arange(4.0)),
        'message_hub': hub.state_dict(),
        'args': argparse.Namespace(model='nat_mini', lr=1e-3),
        'array': np.arange(6, dtype='>f4').reshape(2, 3),
    }


def assert_benign_loads(folder: pathlib.Path) -> None:
    folder.mkdir(exist_ok=True)
    path = folder / 'benign.pth'
    torch.save(benign_checkpoint(), path)
    loaded = load_checkpoint(path)
    path.unlink()
    assert torch.equal(loaded['state_dict']['weight'], torch.arange(4.0))
    assert loaded['message_hub']['log_scalars']['train/loss'].mean() == pytest.approx(1.75 / 3)
    assert loaded['args'].model == 'nat_mini'


def run_guarded(load: Callable[[], Any], watched: pathlib.Path) -> Any:
    """Runs a hostile load; checks that nothing it could reach changed; returns the result or the
    NatMMError (refused or unreadable, with the file named)."""
    before_state, before_files = snapshot_state(), files_under(watched)
    outcome: Any
    try:
        outcome = load()
    except NatMMError as error:
        outcome = error
    else:
        assert_plain_data(outcome)
    assert files_under(watched) == before_files, 'a load created or removed a file'
    after = snapshot_state()
    changed = [key for key in before_state if before_state[key] != after.get(key)]
    assert not changed, f'a load changed {changed}'
    return outcome


@pytest.fixture
def guarded(tmp_path, monkeypatch) -> Callable[[Callable[[], Any]], Any]:
    """``guarded(load)``: :func:`run_guarded` under tmp_path, then a benign file still loads."""
    watched = tmp_path / 'watched'
    watched.mkdir()
    monkeypatch.chdir(watched)  # relative paths in a file land here too
    assert_benign_loads(tmp_path / 'warm-up')  # lazy imports happen before any snapshot
    torch.serialization._get_layout('torch.strided')  # fills its cache on first use

    def run(load: Callable[[], Any]) -> Any:
        outcome = run_guarded(load, tmp_path)
        assert_benign_loads(tmp_path / 'after')
        return outcome

    return run


def refused(outcome: Any) -> str:
    assert isinstance(outcome, UnsafeCheckpointError), f'not refused: {outcome!r}'
    message = str(outcome)
    assert 'refusing to unpickle the checkpoint' in message and '--trust-checkpoint' in message
    return message


# ----------------------------------------------------------------------------- two known attacks


def history_buffer_exploit(marker: pathlib.Path, poison: bool) -> bytes:
    """The attack on the old loader: poison HistoryBuffer's statistics dict, then use getattr
    to reach object.__getattribute__, a function's __globals__, builtins and eval."""
    hb = Op.glob('mmengine.logging.history_buffer.HistoryBuffer')
    getattr_ = Op.glob('builtins.getattr')
    steps = []
    if poison:
        state = Op.dict(
            statistics_methods=Op.dict(__getattribute__=Op.NONE, __init__=Op.NONE),
            max_length=Op.int(1),
            _log_history=Op.list(),
            _count_history=Op.list(),
        )
        steps.append(Op.build(Op.new(hb), state))
    get_attribute = Op.put(1, Op.call(getattr_, hb, Op.str('__getattribute__')))
    init = Op.call(getattr_, hb, Op.str('__init__'))
    module_globals = Op.put(2, Op.call(Op.get(1), init, Op.str('__globals__')))
    dict_get = Op.call(Op.get(1), Op.get(2), Op.str('get'))
    builtins_ = Op.put(3, Op.call(dict_get, Op.str('__builtins__')))
    builtins_get = Op.call(Op.get(1), Op.get(3), Op.str('get'))
    eval_ = Op.call(builtins_get, Op.str('eval'))
    steps.append(Op.call(eval_, Op.str(eval_payload(marker))))
    return Op.program(Op.tuple(get_attribute, module_globals, builtins_, *steps))


@pytest.mark.parametrize('poison', [True, False], ids=['poison-and-exploit', 'exploit'])
def test_the_history_buffer_getattr_escape_is_refused(poison, guarded, tmp_path):
    marker = tmp_path / 'watched' / 'EXECUTED'
    path = write_zip(tmp_path / 'hb.pth', history_buffer_exploit(marker, poison))
    message = refused(guarded(lambda: load_checkpoint(path)))
    assert "getattr(HistoryBuffer, '__getattribute__')" in message
    assert not marker.exists()


def test_poisoning_in_one_file_does_not_widen_the_next(guarded, tmp_path):
    marker = tmp_path / 'watched' / 'EXECUTED'
    hb = Op.glob('mmengine.logging.history_buffer.HistoryBuffer')
    stat = Op.call(Op.glob('builtins.getattr'), hb, Op.str('min'))
    poison = Op.build(
        Op.new(hb),
        Op.dict(
            statistics_methods=Op.dict(__getattribute__=stat, __init__=stat, min=stat),
            max_length=Op.int(1),
            _log_history=Op.list(),
            _count_history=Op.list(),
        ),
    )
    first = write_zip(tmp_path / 'first.pth', Op.program(poison))
    message = refused(guarded(lambda: load_checkpoint(first)))
    assert 'HistoryBuffer statistics' in message
    second = write_zip(tmp_path / 'second.pth', history_buffer_exploit(marker, poison=False))
    refused(guarded(lambda: load_checkpoint(second)))
    assert not marker.exists()


def namespace_patch_writer(target: pathlib.Path) -> bytes:
    """The attack on the old loader's legacy path: setattr on the class argparse.Namespace
    (dump_patches, __name__), then a persistent id ('module', Namespace, ...) whose source check
    writes ``<__name__>.patch``."""
    namespace = Op.put(1, Op.glob('argparse.Namespace'))
    slots = Op.dict(dump_patches=Op.TRUE, __name__=Op.str(str(target)))
    patched = Op.build(namespace, Op.tuple(Op.NONE, slots))
    pid = Op.tuple(Op.str('module'), Op.get(1), Op.str('nat_mm_attack.py'), Op.str('x = 1\n'))
    return Op.program(Op.tuple(patched, Op.persistent(pid)))


@pytest.mark.parametrize('layout', ['legacy', 'zip'])
def test_the_namespace_class_setattr_and_patch_file_are_refused(layout, guarded, tmp_path):
    target = tmp_path / 'watched' / 'planted'
    program = namespace_patch_writer(target)
    writer = write_legacy if layout == 'legacy' else write_zip
    path = writer(tmp_path / f'{layout}.pth', program)
    message = refused(guarded(lambda: load_checkpoint(path)))
    assert ('legacy (non-zip)' in message) == (layout == 'legacy')
    assert not pathlib.Path(f'{target}.patch').exists()
    assert not hasattr(argparse.Namespace, 'dump_patches')


def test_a_benign_legacy_file_needs_trust(guarded, tmp_path):
    path = tmp_path / 'legacy.pth'
    torch.save({'w': torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    message = refused(guarded(lambda: load_checkpoint(path)))
    assert 'legacy (non-zip) torch file' in message
    assert torch.equal(load_checkpoint(path, trust=True)['w'], torch.ones(2))


# ----------------------------------------------------------------------------- accepted globals

HOSTILE_ARGS = {
    'none': (),
    'code': (Op.str('__import__("os").system("touch EXECUTED")'),),
    'module-and-name': (Op.str('os'), Op.str('system')),
    'int': (Op.int(7),),
    'negative': (Op.int(-1),),
    'nested': (Op.tuple(Op.tuple(Op.str('x'), Op.NONE)),),
    'dict': (Op.dict(__class__=Op.glob('collections.OrderedDict')),),
}
DANGEROUS_NAMES = (
    '__getattribute__',
    '__init__',
    '__new__',
    '__globals__',
    '__class__',
    '__subclasses__',
    '__dict__',
    '__setstate__',
    '__reduce__',
    '__reduce_ex__',
    '__builtins__',
    '__call__',
    '__code__',
    'mro',
    'register_statistics',
    '_statistics_methods',
    'statistics',
    'update',
    'fromkeys',
    'get',
    'system',
    'eval',
    'load',
    'min ',
    'MIN',
    'Mean',
)
POISON_STATE = Op.dict(
    __class__=Op.glob('collections.OrderedDict'),
    __setstate__=Op.glob('builtins.getattr'),
    _statistics_methods=Op.dict(eval=Op.NONE),
    dump_patches=Op.TRUE,
    __name__=Op.str('EXECUTED'),
)


def attacks_on(name: str) -> dict[str, bytes]:
    g = Op.glob(name)
    cases = {'value': g}
    for label, args in HOSTILE_ARGS.items():
        cases[f'reduce-{label}'] = Op.call(g, *args)
        cases[f'newobj-{label}'] = Op.new(g, *args)
    cases['build-class-dict'] = Op.build(g, POISON_STATE)
    cases['build-class-slots'] = Op.build(g, Op.tuple(Op.NONE, POISON_STATE))
    cases['build-instance-dict'] = Op.build(Op.new(g), POISON_STATE)
    cases['build-instance-slots'] = Op.build(Op.new(g), Op.tuple(Op.NONE, POISON_STATE))
    cases['build-called-dict'] = Op.build(Op.call(g), POISON_STATE)
    cases['build-called-twice'] = Op.build(Op.build(Op.new(g), Op.dict()), POISON_STATE)
    for attr in DANGEROUS_NAMES:
        cases[f'getattr-{attr.strip()}'] = Op.call(Op.glob('builtins.getattr'), g, Op.str(attr))
    if name != 'mmengine.logging.history_buffer.HistoryBuffer':
        for statistic in sorted(HISTORY_BUFFER_STATISTICS):
            cases[f'getattr-stat-{statistic}'] = Op.call(
                Op.glob('builtins.getattr'), g, Op.str(statistic)
            )
    return cases


ACCEPTED = allowed_global_names()


def test_the_generated_attacks_cover_every_accepted_global():
    assert len(ACCEPTED) > 100 and all(len(attacks_on(name)) >= 40 for name in ACCEPTED)
    # nat_mm's additions to torch's defaults: its own stand-ins, and one builtin type
    ours = {name: obj for obj, name in EXTRA_GLOBALS}
    assert set(ours) <= set(ACCEPTED) and ours['builtins.frozenset'] is frozenset
    assert all(
        getattr(obj, '__module__', '') == 'nat_mm.checkpoint.unpickling'
        for name, obj in ours.items()
        if name != 'builtins.frozenset'
    )


@pytest.mark.parametrize('protocol', [2, 4])
@pytest.mark.parametrize('name', ACCEPTED)
def test_every_accepted_global_under_attack(name, protocol, guarded, tmp_path):
    """Every attack on one global, each refused or harmless and creating no file; then nothing
    that a file could reach has changed and a benign file still loads (``guarded``)."""
    marker = tmp_path / 'watched' / 'EXECUTED'

    def attack_all() -> None:
        for label, body in attacks_on(name).items():
            path = write_zip(tmp_path / 'watched' / f'{label}.pth', Op.program(body, protocol))
            before = files_under(tmp_path)
            try:
                outcome: Any = load_checkpoint(path)
            except NatMMError as error:
                outcome = error
            else:
                assert_plain_data(outcome)
            assert files_under(tmp_path) == before, f'{label} created or removed a file'
            if label.startswith(('build-class', 'getattr-')):  # never on a class, never general
                message = refused(outcome)
                if label.startswith('getattr-'):
                    assert 'refusing getattr' in message, (label, message)
            assert not marker.exists(), label
            pathlib.Path(path).unlink()

    guarded(attack_all)


def test_a_legacy_file_is_refused_before_anything_is_unpickled(guarded, tmp_path):
    marker = tmp_path / 'watched' / 'EXECUTED'
    path = write_legacy(tmp_path / 'legacy.pth', history_buffer_exploit(marker, poison=True))
    assert 'legacy (non-zip)' in refused(guarded(lambda: load_checkpoint(path)))
    assert not marker.exists()


# ----------------------------------------------------------------------------- persistent ids


PERSISTENT_IDS = {
    'module': Op.tuple(Op.str('module'), Op.glob('argparse.Namespace'), Op.str('x.py'), Op.str('')),
    'int': Op.int(7),
    'storage-of-a-class': Op.tuple(
        Op.str('storage'), Op.glob('argparse.Namespace'), Op.str('0'), Op.str('cpu'), Op.int(4)
    ),
    'storage-outside-the-archive': Op.tuple(
        Op.str('storage'),
        Op.glob('torch.FloatStorage'),
        Op.str('../../../../etc/passwd'),
        Op.str('cpu'),
        Op.int(4),
    ),
    'storage-with-a-hostile-location': Op.tuple(
        Op.str('storage'),
        Op.glob('torch.FloatStorage'),
        Op.str('0'),
        Op.str('__import__("os").system("touch EXECUTED")'),
        Op.int(1),
    ),
}


@pytest.mark.parametrize('kind', sorted(PERSISTENT_IDS))
def test_persistent_ids_other_than_storages(kind, guarded, tmp_path):
    records = {'data/0': struct.pack('<f', 1.0)}
    path = write_zip(tmp_path / 'pid.pth', Op.program(Op.persistent(PERSISTENT_IDS[kind])), records)
    outcome = guarded(lambda: load_checkpoint(path))  # refused, or a plain storage
    if kind != 'storage-with-a-hostile-location':  # map_location='cpu' overrides the location
        assert isinstance(outcome, NatMMError), outcome
    assert not (tmp_path / 'watched' / 'EXECUTED').exists()


# ----------------------------------------------------------------------------- protocols 2-5


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


@pytest.mark.parametrize('protocol', [2, 3, 4, 5])
def test_payloads_in_every_protocol(protocol, guarded, tmp_path):
    marker = tmp_path / 'watched' / 'EXECUTED'
    path = tmp_path / f'p{protocol}.pth'
    torch.save({'w': torch.ones(1), 'x': _Payload(str(marker))}, path, pickle_protocol=protocol)
    refused(guarded(lambda: load_checkpoint(path)))
    assert not marker.exists()


@pytest.mark.parametrize('protocol', [2, 3, 4, 5])
def test_benign_files_in_every_protocol(protocol, guarded, tmp_path):
    path = tmp_path / f'p{protocol}.pth'
    torch.save(benign_checkpoint(), path, pickle_protocol=protocol)
    outcome = guarded(lambda: load_checkpoint(path))
    if protocol == 2:  # what torch.save writes by default
        assert outcome['args'].lr == 1e-3
    else:  # opcodes torch's weights-only reader does not take: refused, with the opt-in
        refused(outcome)
        assert load_checkpoint(path, trust=True)['args'].lr == 1e-3


# ----------------------------------------------------------------------------- the records


def dtype_program(code: str, state: bytes | None = None, args: tuple[bytes, ...] | None = None):
    dtype = Op.call(Op.glob('numpy.dtype'), *(args or (Op.str(code), b'\x89', Op.TRUE)))
    return Op.program(dtype if state is None else Op.build(dtype, state))


@pytest.mark.parametrize(
    ('label', 'program'),
    [
        ('object dtype', dtype_program('O8')),
        ('structured dtype', dtype_program('V8')),
        ('unicode dtype', dtype_program('U4')),
        (
            'fields',
            dtype_program(
                'f8',
                Op.tuple(
                    Op.int(3),
                    Op.str('<'),
                    Op.NONE,
                    Op.tuple(Op.str('a')),
                    Op.dict(),
                    Op.int(-1),
                    Op.int(-1),
                    Op.int(0),
                ),
            ),
        ),
        (
            'flags',
            dtype_program(
                'f8',
                Op.tuple(
                    Op.int(3),
                    Op.str('<'),
                    Op.NONE,
                    Op.NONE,
                    Op.NONE,
                    Op.int(-1),
                    Op.int(-1),
                    Op.int(63),
                ),
            ),
        ),
        ('no copy', dtype_program('f8', args=(Op.str('f8'), b'\x89', Op.int(0)))),
    ],
)
def test_numpy_dtypes_other_than_plain_numbers_are_refused(label, program, guarded, tmp_path):
    path = write_zip(tmp_path / 'dtype.pth', program)
    assert 'numpy.dtype' in refused(guarded(lambda: load_checkpoint(path)))


def test_the_builtin_float64_dtype_cannot_be_changed(guarded, tmp_path):
    # numpy.dtype('f8', False, False) is the shared descriptor; BUILD would be its __setstate__
    state = Op.tuple(
        Op.int(3), Op.str('>'), Op.NONE, Op.NONE, Op.NONE, Op.int(-1), Op.int(-1), Op.int(0)
    )
    program = dtype_program('f8', state, args=(Op.str('f8'), b'\x89', b'\x89'))
    path = write_zip(tmp_path / 'dtype.pth', program)
    outcome = guarded(lambda: load_checkpoint(path))
    assert outcome == np.dtype('>f8') and np.dtype('f8').byteorder == '='


@pytest.mark.parametrize('data_size', [0, 7, 9, 1 << 20])
def test_numpy_arrays_whose_data_does_not_fit_the_shape_are_refused(data_size, guarded, tmp_path):
    dtype = Op.call(Op.glob('numpy.dtype'), Op.str('f8'), b'\x89', Op.TRUE)
    array = Op.call(
        Op.glob('numpy._core.multiarray._reconstruct'),
        Op.glob('numpy.ndarray'),
        Op.tuple(Op.int(0)),
        Op.str('b'),
    )
    data = Op.call(Op.glob('_codecs.encode'), Op.str('\x00' * data_size), Op.str('latin1'))
    state = Op.tuple(Op.int(1), Op.tuple(Op.int(1)), dtype, b'\x89', data)
    path = write_zip(tmp_path / 'array.pth', Op.program(Op.build(array, state)))
    assert 'numpy array' in refused(guarded(lambda: load_checkpoint(path)))


def test_a_record_that_contains_itself_is_refused(guarded, tmp_path):
    array = Op.put(
        1,
        Op.call(
            Op.glob('numpy.core.multiarray._reconstruct'),
            Op.glob('numpy.ndarray'),
            Op.tuple(Op.int(0)),
            Op.str('b'),
        ),
    )
    state = Op.tuple(Op.int(1), Op.tuple(Op.int(1)), Op.get(1), b'\x89', Op.list(Op.get(1)))
    path = write_zip(tmp_path / 'cycle.pth', Op.program(Op.build(array, state)))
    refused(guarded(lambda: load_checkpoint(path)))


def test_a_history_buffer_with_other_attributes_is_refused(guarded, tmp_path):
    hb = Op.glob('mmengine.logging.history_buffer.HistoryBuffer')
    state = Op.dict(
        max_length=Op.int(1),
        _log_history=Op.list(),
        _count_history=Op.list(),
        _statistics_methods=Op.dict(),
    )
    path = write_zip(tmp_path / 'hb.pth', Op.program(Op.build(Op.new(hb), state)))
    assert 'HistoryBuffer holds exactly' in refused(guarded(lambda: load_checkpoint(path)))


def test_a_namespace_with_non_string_names_is_refused(guarded, tmp_path):
    state = Op.dict_of([(Op.int(1), Op.int(2))])
    path = write_zip(
        tmp_path / 'ns.pth', Op.program(Op.build(Op.new(Op.glob('argparse.Namespace')), state))
    )
    assert 'argparse.Namespace' in refused(guarded(lambda: load_checkpoint(path)))


# ----------------------------------------------------------------------------- safe globals


def test_the_process_safe_globals_neither_widen_nor_change(guarded, tmp_path):
    path = tmp_path / 'timedelta.pth'
    torch.save({'d': datetime.timedelta(days=1)}, path)
    process_list = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([datetime.timedelta])
    try:
        before = torch.serialization.get_safe_globals()
        assert torch.load(path, weights_only=True)['d'] == datetime.timedelta(days=1)
        # nat_mm's allowlist is its own: what the process added is not accepted ...
        assert 'datetime.timedelta' in refused(guarded(lambda: load_checkpoint(path)))
        # ... and is still there afterwards
        assert sorted(map(str, torch.serialization.get_safe_globals())) == sorted(map(str, before))
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(process_list)


# ----------------------------------------------------------------------------- real checkpoints


def test_an_mmengine_run_checkpoint_loads_exactly(tmp_path):
    checkpoint = benign_checkpoint()
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    checkpoint['optimizer'] = optimizer.state_dict()
    checkpoint['param_schedulers'] = [{'base_values': [0.1], 'last_step': 3, 'by_epoch': False}]
    torch.save(checkpoint, tmp_path / 'iter_3.pth')
    loaded = load_checkpoint(tmp_path / 'iter_3.pth')
    buffer = loaded['message_hub']['log_scalars']['train/loss']
    original = checkpoint['message_hub']['log_scalars']['train/loss']
    assert type(buffer) is HistoryBuffer and buffer.max_length == original.max_length
    for got, want in zip(buffer.data, original.data, strict=True):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype
    assert buffer.statistics('mean') == original.mean() and buffer.current() == 0.25
    assert loaded['message_hub']['runtime_info']['iter'] == 3
    assert type(loaded['meta']['seed']) is np.int64 and loaded['meta']['seed'] == 7
    assert loaded['array'].dtype == np.dtype('>f4')
    np.testing.assert_array_equal(loaded['array'], checkpoint['array'])
    assert loaded['optimizer']['param_groups'][0]['lr'] == 0.1
    assert torch.equal(
        loaded['optimizer']['state'][0]['exp_avg'], optimizer.state_dict()['state'][0]['exp_avg']
    )
    # it resumes: mmengine's message hub takes the loaded buffers as its own
    hub = MessageHub.get_instance('nat_mm_attack_suite_resumed')
    hub.load_state_dict(loaded['message_hub'])
    hub.update_scalar('train/loss', 0.125)
    assert hub.get_scalar('train/loss').current() == 0.125


@pytest.mark.parametrize(
    'dtype', ['b1', 'i1', 'u1', 'i2', 'u2', '<i4', '>i4', 'u8', 'f2', '>f8', 'c8', 'c16']
)
@pytest.mark.parametrize('shape', [(), (0,), (3,), (2, 3)])
def test_numpy_arrays_and_scalars_round_trip(dtype, shape, tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 2, size=shape) if dtype == 'b1' else rng.random(shape) * 100
    array = np.asfortranarray(array.astype(dtype)) if len(shape) == 2 else array.astype(dtype)
    scalar = array.reshape(-1)[0] if array.size else np.zeros(1, dtype)[0]
    torch.save({'a': array, 's': scalar}, tmp_path / 'np.pth')
    loaded = load_checkpoint(tmp_path / 'np.pth')
    assert loaded['a'].dtype == array.dtype and loaded['a'].shape == array.shape
    np.testing.assert_array_equal(loaded['a'], array)
    assert loaded['a'].flags.f_contiguous == array.flags.f_contiguous
    assert type(loaded['s']) is type(scalar) and loaded['s'] == scalar


def test_upstream_layouts_load_without_trust(tmp_path):
    """mmcv 1.x (mmdet 2.x / mmseg 0.x), timm / original, HuggingFace and nat_mm files."""
    weights = collections.OrderedDict(
        (f'backbone.levels.0.blocks.0.attn.{k}', torch.randn(3)) for k in ('qkv.bias', 'rpb')
    )
    weights._metadata = collections.OrderedDict({'': {'version': 1}})
    mmcv1 = {
        'meta': {
            'mmcv_version': '1.4.8',
            'mmdet_version': '2.23.0',
            'CLASSES': ('person', 'car'),
            'PALETTE': [[220, 20, 60], [0, 0, 142]],
            'env_info': 'sys.platform: linux',
            'config': "model = dict(type='MaskRCNN')",
            'seed': 0,
            'exp_name': 'x.py',
            'epoch': 36,
            'iter': 88000,
            'time': 'Thu Jun  2 2022',
            'hook_msgs': {'last_ckpt': 'x'},
        },
        'state_dict': weights,
        'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-4, 'betas': (0.9, 0.999)}]},
    }
    timm = {
        'epoch': 309,
        'arch': 'nat_mini',
        'state_dict': weights,
        'version': 2,
        'args': argparse.Namespace(model='nat_mini', smoothing=0.1),
        'metric': 81.8,
    }
    for label, checkpoint in {'mmcv1': mmcv1, 'timm': timm, 'hf': weights}.items():
        torch.save(checkpoint, tmp_path / f'{label}.pth')
        loaded = load_checkpoint(tmp_path / f'{label}.pth')
        state = loaded.get('state_dict', loaded)
        assert list(state) == list(weights) and state._metadata == weights._metadata
    assert load_checkpoint(tmp_path / 'mmcv1.pth')['meta']['CLASSES'] == ('person', 'car')
    assert load_checkpoint(tmp_path / 'timm.pth')['args'].smoothing == 0.1


def test_force_weights_only_in_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv('TORCH_FORCE_WEIGHTS_ONLY_LOAD', '1')
    torch.save(benign_checkpoint(), tmp_path / 'benign.pth')
    assert load_checkpoint(tmp_path / 'benign.pth')['args'].model == 'nat_mini'
    torch.save({'d': collections.deque([1])}, tmp_path / 'deque.pth')
    with pytest.raises(NatMMError, match='TORCH_FORCE_WEIGHTS_ONLY_LOAD is set'):
        load_checkpoint(tmp_path / 'deque.pth', trust=True)


def test_the_hand_written_pickles_are_what_they_claim(tmp_path):
    """The assembler writes pickles the standard library reads (so the attacks are real)."""
    program = Op.program(
        Op.tuple(
            Op.str('a'),
            Op.int(-3),
            Op.dict(k=Op.list(Op.NONE)),
            Op.call(Op.glob('builtins.set'), Op.list(Op.int(1))),
        )
    )
    assert pickle.loads(program) == ('a', -3, {'k': [None]}, {1})
    assert load_checkpoint(write_zip(tmp_path / 'x.pth', program)) == ('a', -3, {'k': [None]}, {1})
    path = tmp_path / 'legacy.pth'
    write_legacy(path, Op.program(Op.dict(w=Op.int(5))))
    assert torch.load(path, weights_only=False) == {'w': 5}


# ----------------------------------------------------------------------------- found by review


def storage(key: str, numel: int, kind: str = 'torch.FloatStorage') -> bytes:
    pid = Op.tuple(Op.str('storage'), Op.glob(kind), Op.str(key), Op.str('cpu'), Op.int(numel))
    return Op.persistent(pid)


def dense(key: str, numel: int, kind: str = 'torch.FloatStorage', hooks: bytes = b'') -> bytes:
    """``_rebuild_tensor_v2`` of a 1-D tensor, as torch.save writes one."""
    return Op.call(
        Op.glob('torch._utils._rebuild_tensor_v2'),
        storage(key, numel, kind),
        Op.int(0),
        Op.tuple(Op.int(numel)),
        Op.tuple(Op.int(1)),
        b'\x89',
        hooks or Op.call(Op.glob('collections.OrderedDict')),
    )


REFUSED_DTYPE = Op.call(Op.glob('numpy.dtype'), Op.str('O8'), b'\x89', Op.TRUE)


@pytest.mark.parametrize('kind', ['collections.OrderedDict', 'collections.Counter'])
def test_a_container_cannot_hide_its_contents_behind_instance_attributes(kind, guarded, tmp_path):
    # BUILD on an OrderedDict / Counter sets instance attributes: `items` / `clear` = set would
    # hide the contents from validation, and the refused dtype record would come back raw.
    container = Op.call(Op.glob(kind)) + Op.str('dtype') + REFUSED_DTYPE + b's'
    hidden = Op.build(
        container, Op.dict(items=Op.glob('builtins.set'), clear=Op.glob('builtins.set'))
    )
    path = write_zip(tmp_path / 'hidden.pth', Op.program(Op.dict(state_dict=hidden)))
    assert "attributes ['clear', 'items']" in refused(guarded(lambda: load_checkpoint(path)))


@pytest.mark.parametrize('where', ['attributes', 'hooks', 'parameter-state'])
def test_tensors_carry_no_attributes_or_hooks(where, guarded, tmp_path):
    records = {'data/0': struct.pack('<4f', 1, 2, 3, 4)}
    if where == 'attributes':  # _rebuild_from_type_v2's state becomes tensor attributes
        args = Op.tuple(storage('0', 4), Op.int(0), Op.tuple(Op.int(4)), Op.tuple(Op.int(1)),
                        b'\x89', Op.call(Op.glob('collections.OrderedDict')))  # fmt: skip
        tensor = Op.call(Op.glob('torch._tensor._rebuild_from_type_v2'),
                         Op.glob('torch._utils._rebuild_tensor_v2'), Op.glob('torch.Tensor'),
                         args, Op.dict(payload=REFUSED_DTYPE))  # fmt: skip
    else:  # backward hooks run on backward(); a Parameter's state becomes attributes too
        hooks = Op.call(Op.glob('collections.OrderedDict'),
                        Op.list(Op.tuple(Op.int(0), Op.glob('builtins.complex'))))  # fmt: skip
        tensor = dense('0', 4, hooks=hooks)
        if where == 'parameter-state':
            tensor = Op.call(Op.glob('torch._utils._rebuild_parameter_with_state'), dense('0', 4),
                             Op.TRUE, Op.call(Op.glob('collections.OrderedDict')),
                             Op.dict(hidden=REFUSED_DTYPE))  # fmt: skip
    path = write_zip(tmp_path / 'tensor.pth', Op.program(Op.dict(w=tensor)), records)
    message = refused(guarded(lambda: load_checkpoint(path)))
    assert ('backward hooks' in message) == (where == 'hooks'), message


def test_a_sparse_tensor_with_indices_out_of_bounds_is_refused(guarded, tmp_path):
    # torch validates loaded sparse tensors only with its (default off) invariant check; an index
    # past the size writes out of bounds when the tensor is densified (to_dense, copy_).
    records = {'data/0': struct.pack('<q', 1 << 28), 'data/1': struct.pack('<f', 1234.5)}
    long_storage = storage('0', 1, 'torch.LongStorage')
    indices = Op.call(Op.glob('torch._utils._rebuild_tensor_v2'), long_storage,
                      Op.int(0), Op.tuple(Op.int(1), Op.int(1)), Op.tuple(Op.int(1), Op.int(1)),
                      b'\x89', Op.call(Op.glob('collections.OrderedDict')))  # fmt: skip
    layout = Op.call(Op.glob('torch.serialization._get_layout'), Op.str('torch.sparse_coo'))
    sparse = Op.call(Op.glob('torch._utils._rebuild_sparse_tensor'), layout,
                     Op.tuple(indices, dense('1', 1), Op.tuple(Op.int(4))))  # fmt: skip
    path = write_zip(tmp_path / 'sparse.pth', Op.program(Op.dict(w=sparse)), records)
    outcome = guarded(lambda: load_checkpoint(path))
    assert isinstance(outcome, NatMMError) and 'index' in str(outcome).lower(), outcome
    assert not torch.sparse.check_sparse_tensor_invariants.is_enabled()  # restored


def test_a_benign_sparse_tensor_is_refused_too(tmp_path):
    torch.save({'w': torch.eye(3).to_sparse()}, tmp_path / 'sparse.pth')
    with pytest.raises(UnsafeCheckpointError, match=r'torch\.sparse_coo tensor'):
        load_checkpoint(tmp_path / 'sparse.pth')


def test_safe_globals_added_by_another_thread_during_a_load(tmp_path, monkeypatch):
    """What another thread adds meanwhile is kept, and that load is refused (it may have read
    more than nat_mm allows)."""
    torch.save({'w': torch.ones(1)}, tmp_path / 'benign.pth')
    real_load = torch.load

    def load_while_another_thread_adds(*args, **kwargs):
        torch.serialization.add_safe_globals([datetime.date])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, 'load', load_while_another_thread_adds)
    before = torch.serialization.get_safe_globals()  # torch registers some on import
    try:
        with pytest.raises(UnsafeCheckpointError, match='another thread'):
            load_checkpoint(tmp_path / 'benign.pth')
        after = torch.serialization.get_safe_globals()
        assert sorted(map(str, after)) == sorted(map(str, [*before, datetime.date]))
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def test_a_refused_load_leaves_torch_map_location_as_it_was(tmp_path):
    path = write_zip(tmp_path / 'bad.pth', Op.program(Op.glob('posix.system')))
    before = getattr(torch.serialization._serialization_tls, 'map_location', None)
    refused(run_guarded(lambda: load_checkpoint(path), tmp_path))
    assert getattr(torch.serialization._serialization_tls, 'map_location', None) == before


def test_a_large_state_dict_keeps_every_key_in_order(tmp_path):
    # Rebuilding an OrderedDict through dict's own methods loses keys from its iteration order.
    weights = collections.OrderedDict(
        (f'layer{i}.weight', torch.full((2,), float(i))) for i in range(300)
    )
    torch.save({'state_dict': weights}, tmp_path / 'big.pth')
    loaded = load_checkpoint(tmp_path / 'big.pth')['state_dict']
    assert list(loaded) == list(weights) and len(loaded) == 300
    assert all(torch.equal(loaded[key], value) for key, value in weights.items())
