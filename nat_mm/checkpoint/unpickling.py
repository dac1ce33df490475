"""Unpickling a checkpoint without running code from it: torch's weights-only unpickler, records.

The base is ``torch.load(weights_only=True)``, the unpickler PyTorch maintains for untrusted files:
it builds only allowlisted globals, calls only allowlisted functions, applies pickle's BUILD only
to *instances* of allowlisted types (never to a class or a module), restricts persistent ids to
storages, and reads nothing but the zip archive it was given.

On top of torch's own defaults, a checkpoint written by mmengine holds numpy arrays and scalars and
``HistoryBuffer`` objects (its message hub), and one written by timm / the original NAT training
scripts holds an ``argparse.Namespace``. Letting those real classes be built is what made the old
loader attackable: ``HistoryBuffer.__setstate__`` writes the file's state into a class-level dict,
numpy's ``dtype.__setstate__`` can change a shared built-in dtype, and a general ``getattr`` reaches
anything. So none of them is built while unpickling. Each name below stands for an inert *record*
of this module that only keeps the arguments and states the file gives it; after the unpickler has
finished, :func:`materialize` validates every record against the exact shape numpy, mmengine and
argparse write and builds the real object with their public constructors. A record that does not
match is refused, naming what was wrong. Nothing in this module holds state that a file can change:
the allowed names, dtypes and statistics are frozen here, at import.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch._utils
import torch.serialization

# mmengine's HistoryBuffer pickles its four built-in statistics methods (protocol 2 writes
# ``getattr(HistoryBuffer, 'min')``); a statistic registered by a user pickles as its own global,
# which is refused like any other.
HISTORY_BUFFER_STATISTICS = frozenset({'min', 'max', 'current', 'mean'})
# numpy dtype codes as numpy pickles them (``numpy.dtype('f8', False, True)``): booleans, integers,
# floats and complex numbers. Object, string, void (structured) and datetime dtypes are refused.
NUMPY_DTYPE_CODES = frozenset(
    {'b1', 'i1', 'i2', 'i4', 'i8', 'u1', 'u2', 'u4', 'u8', 'f2', 'f4', 'f8', 'c8', 'c16'}
)
_BYTE_ORDERS = frozenset({'<', '>', '|', '='})


class RefusedRecord(Exception):
    """A file asked for something the records do not build (turned into UnsafeCheckpointError)."""


# ----------------------------------------------------------------------------- records


class _Record:
    """What the file asked to build: the arguments of its call and the states of its BUILDs."""

    __slots__ = ('args', 'states')
    what: ClassVar[str] = ''

    def __new__(cls, *args: Any) -> _Record:  # REDUCE calls cls(*args), NEWOBJ cls.__new__
        record = object.__new__(cls)
        record.args = args
        record.states = []
        return record

    def __init__(self, *args: Any) -> None:  # __new__ kept the arguments
        pass

    def __setstate__(self, state: Any) -> None:  # torch's BUILD calls it: nothing is applied
        self.states.append(state)

    def __reduce__(self) -> Any:
        raise TypeError(f'{type(self).__name__} is an unvalidated checkpoint record')

    def __repr__(self) -> str:
        return f'{self.what}(args={self.args!r}, states={self.states!r})'


class NumpyArrayType(_Record):
    what = 'numpy.ndarray'


class NumpyReconstruct(_Record):
    what = 'numpy.core.multiarray._reconstruct'


class NumpyDtype(_Record):
    what = 'numpy.dtype'


class NumpyScalar(_Record):
    what = 'numpy.core.multiarray.scalar'


class HistoryBufferRecord(_Record):
    what = 'mmengine.logging.history_buffer.HistoryBuffer'


class NamespaceRecord(_Record):
    what = 'argparse.Namespace'


class StatisticRecord:
    """``getattr(HistoryBuffer, name)`` for a built-in statistic (made only below)."""

    __slots__ = ('name',)

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self) -> Any:
        raise TypeError('StatisticRecord is an unvalidated checkpoint record')

    def __repr__(self) -> str:
        return f'getattr(HistoryBuffer, {self.name!r})'


def history_buffer_statistic(owner: Any, name: Any) -> StatisticRecord:
    """``builtins.getattr`` as mmengine's checkpoints use it, and no other way."""
    if owner is not HistoryBufferRecord or type(name) is not str:
        raise RefusedRecord(
            f'refusing getattr({owner!r}, {name!r}): only getattr(HistoryBuffer, statistic) '
            f'for mmengine statistics {sorted(HISTORY_BUFFER_STATISTICS)} is allowed'
        )
    if name not in HISTORY_BUFFER_STATISTICS:
        raise RefusedRecord(
            f'refusing getattr(HistoryBuffer, {name!r}): only the statistics '
            f'{sorted(HISTORY_BUFFER_STATISTICS)} are allowed'
        )
    return StatisticRecord(name)


def empty_bytes(*args: Any) -> bytes:
    """``builtins.bytes`` as protocol 2 writes ``b''`` (other bytes: ``_codecs.encode`` calls)."""
    if args:
        raise RefusedRecord(f'refusing bytes{args!r}: only bytes() (empty) is allowed')
    return b''


# What nat_mm adds to torch's weights-only defaults, by the name a file writes. Tuples, so that
# torch finds our stand-ins under the real names (and nothing else under them).
EXTRA_GLOBALS: tuple[tuple[Any, str], ...] = (
    (NumpyArrayType, 'numpy.ndarray'),
    (NumpyDtype, 'numpy.dtype'),
    (NumpyReconstruct, 'numpy.core.multiarray._reconstruct'),  # files written with numpy 1
    (NumpyReconstruct, 'numpy._core.multiarray._reconstruct'),  # ... and with numpy 2
    (NumpyScalar, 'numpy.core.multiarray.scalar'),
    (NumpyScalar, 'numpy._core.multiarray.scalar'),
    (HistoryBufferRecord, 'mmengine.logging.history_buffer.HistoryBuffer'),
    (history_buffer_statistic, 'builtins.getattr'),
    (NamespaceRecord, 'argparse.Namespace'),
    (empty_bytes, 'builtins.bytes'),  # numpy's empty arrays
    (frozenset, 'builtins.frozenset'),
)


def allowed_global_names() -> list[str]:
    """Every global a file may name without ``trust``: torch's weights-only defaults and ours."""
    from torch._weights_only_unpickler import _get_allowed_globals

    return sorted({*_get_allowed_globals(), *(name for _, name in EXTRA_GLOBALS)})


def _stand_in_name(obj: Any) -> str:
    return next(name for stand_in, name in EXTRA_GLOBALS if stand_in is obj)


_SAFE_GLOBALS_LOCK = threading.Lock()


@contextlib.contextmanager
def only_nat_mm_safe_globals() -> Iterator[None]:
    """torch's user allowlist is exactly :data:`EXTRA_GLOBALS` for the duration of a load.

    ``torch.serialization.safe_globals`` would add ours to whatever the process has added: a
    name added twice resolves to either object. The list is swapped instead (under a lock, since
    it is process-wide) and the process's own list is restored afterwards, with what other
    threads added meanwhile; a load during which the list changed is refused. torch's sparse
    invariant check is on during the load (a second line: sparse tensors are refused anyway).
    The swap is process-wide: a plain ``torch.load(weights_only=True)`` running in another thread
    at the same moment sees nat_mm's list.
    """
    ours = set(EXTRA_GLOBALS)
    with _SAFE_GLOBALS_LOCK, torch.sparse.check_sparse_tensor_invariants():
        before = torch.serialization.get_safe_globals()
        pending_sparse = len(torch._utils._sparse_tensors_to_validate)
        tls = torch.serialization._serialization_tls
        map_location = getattr(tls, 'map_location', None)
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(list(EXTRA_GLOBALS))
        try:
            yield
        finally:
            # What another thread added meanwhile is kept (and nothing of ours stays).
            during = set(torch.serialization.get_safe_globals())
            torch.serialization.clear_safe_globals()
            torch.serialization.add_safe_globals([*before, *(during - ours)])
            # torch queues sparse tensors for validation at the end of a load; a load that
            # failed before the end leaves them queued, and the next load would validate (and
            # fail on) them: a refused file must not make a later, benign one fail.
            del torch._utils._sparse_tensors_to_validate[pending_sparse:]
            tls.map_location = map_location  # torch resets it only after a load that succeeded
        if during != ours:
            raise RefusedRecord(
                'torch.serialization.add_safe_globals was called by another thread during the '
                'load, so it may have read more than nat_mm allows; load the file again'
            )


# ----------------------------------------------------------------------------- materializing


_IN_PROGRESS = object()


def _plain_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A dense tensor without hooks or attributes, as torch.save writes parameters and buffers."""
    if tensor.layout is not torch.strided:
        # torch checks a sparse tensor's indices only when the (off by default) invariant check
        # is on; an index past the size writes out of bounds when the tensor is densified.
        raise RefusedRecord(f'refusing a {tensor.layout} tensor: only dense tensors load')
    if tensor._backward_hooks:
        raise RefusedRecord('refusing a tensor with backward hooks: they would run on backward')
    if vars(tensor):
        raise RefusedRecord(f'refusing a tensor with the attributes {sorted(vars(tensor))}')
    return tensor


def _same(value: Any, expected: Any) -> bool:
    """``value == expected`` for plain values, without calling a method of what the file built."""
    if type(value) is not type(expected):
        return False
    if type(expected) is tuple:
        return len(value) == len(expected) and all(map(_same, value, expected))
    return value == expected


def materialize(obj: Any) -> Any:
    """``obj`` with every record validated and replaced by the real object (or RefusedRecord).

    Containers are rebuilt in place (lists, dicts) or anew (tuples, sets); shared references and
    cycles through lists and dicts are kept, a cycle through a record is refused.
    """
    return _Materializer().build(obj)


class _Materializer:
    def __init__(self) -> None:
        self.memo: dict[int, Any] = {}

    def build(self, obj: Any) -> Any:
        kind = type(obj)
        if kind in (list, tuple, dict, OrderedDict, Counter, set, frozenset) or isinstance(
            obj, (_Record, StatisticRecord)
        ):
            key = id(obj)
            if key in self.memo:
                if self.memo[key] is _IN_PROGRESS:
                    raise RefusedRecord(f'{obj.what} refers to itself')
                return self.memo[key]
        elif (
            obj is history_buffer_statistic
            or obj is empty_bytes
            or (kind is type and issubclass(obj, _Record))
        ):
            raise RefusedRecord(f'the stand-in for {_stand_in_name(obj)} appears as a value')
        elif isinstance(obj, torch.Tensor):
            return _plain_tensor(obj)
        else:
            return obj  # storages, numbers, strings, torch.Size / device / dtype ...
        if kind is list:
            self.memo[key] = obj
            obj[:] = [self.build(item) for item in obj]
            return obj
        if kind in (dict, OrderedDict, Counter):
            self.memo[key] = obj
            # torch's BUILD gives OrderedDict / Counter instances attributes from the file; only
            # a state dict's _metadata is ever written, and anything else could shadow the
            # methods used here (an `items` that hides the contents from this check).
            attributes = vars(obj) if kind is not dict else {}
            if set(attributes) - {'_metadata'}:
                raise RefusedRecord(
                    f'a {kind.__name__} with the attributes {sorted(attributes)} '
                    "(torch writes only a state dict's _metadata)"
                )
            # The type's own methods (OrderedDict keeps its order apart from the dict's).
            items = [(self.build(k), self.build(v)) for k, v in kind.items(obj)]
            kind.clear(obj)
            for name, value in items:  # not update(): Counter.update adds counts
                kind.__setitem__(obj, name, value)
            if '_metadata' in attributes:
                attributes['_metadata'] = self.build(attributes['_metadata'])
            return obj
        if kind is tuple:
            self.memo[key] = built = tuple(self.build(item) for item in obj)
            return built
        if kind in (set, frozenset):
            self.memo[key] = built = kind(self.build(item) for item in obj)
            return built
        if kind is StatisticRecord:
            raise RefusedRecord(f'{obj!r} appears outside a HistoryBuffer')
        self.memo[key] = _IN_PROGRESS
        builder = _BUILDERS.get(kind)
        if builder is None:  # NumpyArrayType: only ever the first argument of _reconstruct
            raise RefusedRecord(f'{obj.what} appears where numpy never writes it')
        self.memo[key] = built = builder(self, obj)
        return built

    def numpy_dtype(self, record: NumpyDtype) -> Any:
        import numpy as np

        args, states = record.args, record.states
        if not (
            len(args) == 3
            and type(args[0]) is str
            and args[0] in NUMPY_DTYPE_CODES
            and all(type(flag) is bool for flag in args[1:])
        ):
            raise RefusedRecord(
                f'refusing numpy.dtype{args!r}: only the dtypes {sorted(NUMPY_DTYPE_CODES)} load'
            )
        dtype = np.dtype(args[0])
        if not states:
            return dtype
        state = states[0]
        if not (
            len(states) == 1
            and type(state) is tuple
            and len(state) == 8
            and _same(state[0], 3)
            and type(state[1]) is str
            and state[1] in _BYTE_ORDERS
            and _same(state[2:], (None, None, None, -1, -1, 0))
        ):
            raise RefusedRecord(
                f'refusing the numpy.dtype state {states!r}: only a byte order is accepted'
            )
        return dtype.newbyteorder(state[1]) if state[1] in '<>' else dtype

    def numpy_array(self, record: NumpyReconstruct) -> Any:
        import numpy as np

        args, states = record.args, record.states
        if len(args) != 3 or args[0] is not NumpyArrayType or len(states) != 1:
            raise RefusedRecord(f'refusing {record!r}: not a numpy array as numpy pickles one')
        state = states[0]
        if not (type(state) is tuple and len(state) == 5 and _same(state[0], 1)):
            raise RefusedRecord(f'refusing the numpy array state {state!r}')
        _, shape, dtype_record, fortran, data = state
        if not (
            type(shape) is tuple
            and all(type(size) is int and size >= 0 for size in shape)
            and type(dtype_record) is NumpyDtype
            and type(fortran) is bool
            and type(data) in (bytes, bytearray)
        ):
            raise RefusedRecord(f'refusing the numpy array state {state!r}')
        dtype = self.build(dtype_record)
        if len(data) != math.prod(shape) * dtype.itemsize:
            raise RefusedRecord(
                f'refusing a numpy array of shape {shape} and dtype {dtype}: '
                f'{len(data)} bytes of data'
            )
        flat = np.frombuffer(bytes(data), dtype=dtype)
        return flat.reshape(shape, order='F' if fortran else 'C').copy(order='K')

    def numpy_scalar(self, record: NumpyScalar) -> Any:
        import numpy as np

        args = record.args
        if not (
            len(args) == 2
            and type(args[0]) is NumpyDtype
            and type(args[1]) is bytes
            and not record.states
        ):
            raise RefusedRecord(f'refusing {record!r}: not a numpy scalar as numpy pickles one')
        dtype = self.build(args[0])
        if len(args[1]) != dtype.itemsize:
            raise RefusedRecord(f'refusing a numpy {dtype} scalar of {len(args[1])} bytes')
        return np.frombuffer(args[1], dtype=dtype)[0]

    def history_buffer(self, record: HistoryBufferRecord) -> Any:
        import numpy as np
        from mmengine.logging import HistoryBuffer

        expected = {'max_length', '_log_history', '_count_history', 'statistics_methods'}
        state = record.states[0] if len(record.states) == 1 else None
        if (
            record.args
            or type(state) is not dict
            or not all(type(name) is str for name in state)
            or not {'max_length', '_log_history', '_count_history'} <= set(state) <= expected
        ):
            raise RefusedRecord(
                f'refusing {record!r}: a HistoryBuffer holds exactly {sorted(expected)}'
            )
        statistics = state.get('statistics_methods', {})
        if type(statistics) is not dict or not all(
            type(method) is StatisticRecord and method.name == name
            for name, method in statistics.items()
        ):
            raise RefusedRecord(f'refusing the HistoryBuffer statistics {statistics!r}')
        max_length = state['max_length']
        log_history = self.build(state['_log_history'])
        count_history = self.build(state['_count_history'])
        if not (
            type(max_length) is int
            and max_length > 0
            and all(
                type(history) is np.ndarray and history.ndim == 1
                for history in (log_history, count_history)
            )
            and len(log_history) == len(count_history)
        ):
            raise RefusedRecord(
                f'refusing the HistoryBuffer state: max_length {max_length!r}, histories '
                f'{log_history!r} and {count_history!r}'
            )
        # The constructor registers the built-in statistics (class-level, fixed by mmengine).
        return HistoryBuffer(log_history, count_history, max_length)

    def namespace(self, record: NamespaceRecord) -> argparse.Namespace:
        states = record.states
        if record.args or len(states) > 1:
            raise RefusedRecord(f'refusing {record!r}: not an argparse.Namespace')
        state = states[0] if states else {}
        if type(state) is not dict or not all(type(name) is str for name in state):
            raise RefusedRecord(f'refusing the argparse.Namespace state {state!r}')
        return argparse.Namespace(**{name: self.build(value) for name, value in state.items()})


_BUILDERS = {
    NumpyDtype: _Materializer.numpy_dtype,
    NumpyReconstruct: _Materializer.numpy_array,
    NumpyScalar: _Materializer.numpy_scalar,
    HistoryBufferRecord: _Materializer.history_buffer,
    NamespaceRecord: _Materializer.namespace,
}
