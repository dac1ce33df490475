"""The commands of the documents a newcomer reads, checked against the real command lines.

Every command of a ```bash block in README.md, configs/README.md and docs/*.md, and every inline
`python tools/...` / `python -m nat_mm.tools...` / `nat-mm-...` command line of their prose, is
parsed by its tool's own argparse parser, built in this process by ``nat_mm.tools.<name>``'s
``parse_args`` (nothing is run): the tool exists, every flag and choice is accepted, every config
it names exists under configs/. Launch scripts (``bash tools/dist_train.sh ...``) have the
arguments they pass on checked the same way. A command no check applies to must match one of
SKIPS, each with its reason (reported by pytest as a skip); any other command fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import itertools
import pathlib
import re
import shlex
from unittest import mock

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = (
    'README.md',
    'configs/README.md',
    *sorted(f'docs/{path.name}' for path in (ROOT / 'docs').glob('*.md')),
)
SHELL_FENCES = {'bash', 'sh', 'shell', 'console'}
FENCE_OPEN = re.compile(r'^\s*(`{3,}|~{3,})')
FENCE_CLOSE = re.compile(r'^\s*(`{3,}|~{3,})\s*$')
FENCE_LINE = re.compile(r'\s*(`{3,}|~{3,})[\w+-]*')  # a fence and at most a language
PYTHONS = {'python', 'python3', '.venv/bin/python'}
# The start of a command line of a tool, in prose (inline code) or in an indented block.
TOOL_LINE = re.compile(r'^(\.venv/bin/)?python3? (tools/|-m nat_mm\.tools\.)|^nat-mm-')
OPERATORS = {'&&', '||', ';', '|'}
# Console scripts of pyproject.toml: nat-mm-NAME -> nat_mm.tools.<module>.
ENTRY_POINTS = dict(
    re.findall(
        r'^(nat-mm-[\w-]+) = "nat_mm\.tools\.(\w+):main"$',
        (ROOT / 'pyproject.toml').read_text(),
        re.MULTILINE,
    )
)
# Launch scripts: the tool they start, and the arguments they pass it from their own.
LAUNCHERS = {
    'tools/dist_train.sh': ('train', lambda a: [a[0], *a[2:]], 2),  # CONFIG NPROC [args]
    'tools/dist_test.sh': ('test', lambda a: [a[0], a[1], *a[3:]], 3),  # CONFIG CKPT NPROC
    'tools/slurm_train.sh': ('train', lambda a: [a[2], '--work-dir', a[3], *a[4:]], 4),
    'tools/slurm_test.sh': ('test', lambda a: [a[2], a[3], *a[4:]], 4),
}
# Commands whose arguments no parser here can check: (pattern, reason). Paths they name under
# configs/ and tools/ are still checked to exist, and a `make TARGET` to be a Makefile target.
SKIPS = (
    (
        r'^make\b',
        'make: the set-up (an mmcv build) or a whole suite / the main job; target checked',
    ),
    (r'^(pip3?|\S*python3? -m pip)\b', 'pip: installs packages'),
    (r'^(torchrun|srun|sbatch)\b', 'a torchrun / Slurm launch outside the launch scripts'),
    (r'^bash tools/(device_check|prepare_device_wheels)\.sh\b', 'the GPU check: CUDA / network'),
    (r'^(mkdir|wget|curl)\b', 'a download from the network'),
    (r'tools/NAME\.py|nat_mm\.tools\.NAME\b|\bnat-mm-NAME\b', 'a placeholder tool name (NAME)'),
)
TOOL_NAMES = {path.stem for path in (ROOT / 'nat_mm' / 'tools').glob('*.py')} - {'__init__', 'cli'}


@dataclasses.dataclass(frozen=True)
class Command:
    doc: str
    line: int
    text: str  # continuations joined, comments kept
    words: tuple[str, ...]  # one simple command: comments, env assignments, operators removed
    inline: bool = False
    error: str = ''  # why it could not be split into words


def _outside_fences(lines: list[str]) -> list[str]:
    """The lines with every fenced block (fences included) blanked, so numbering is kept."""
    kept, fence = [], None
    for line in lines:
        if fence is None:
            match = FENCE_OPEN.match(line)
            fence = match.group(1) if match else None
            kept.append('' if match else line)
        else:
            if FENCE_CLOSE.match(line) and line.strip().startswith(fence):
                fence = None
            kept.append('')
    return kept


def _split(doc: str, line: int, text: str, inline: bool) -> list[Command]:
    try:
        words = shlex.split(text, comments=True)
    except ValueError as error:
        return [Command(doc, line, text, (), inline, str(error))]
    commands, current = [], []
    for word in [*words, ';']:
        if word in OPERATORS:
            while current and re.match(r'^[A-Za-z_]\w*=', current[0]):
                current.pop(0)  # VAR=value before the command
            if current:
                commands.append(Command(doc, line, text, tuple(current), inline))
            current = []
        else:
            current.append(word)
    return commands


def _fenced_commands(doc: str) -> list[Command]:
    commands, fence, language, pending, start = [], None, '', '', 0
    for number, line in enumerate((ROOT / doc).read_text().splitlines(), 1):
        if fence is None:
            match = FENCE_OPEN.match(line)
            if match:
                fence, language = match.group(1), line.strip()[len(match.group(1)) :].strip()
            continue
        if FENCE_CLOSE.match(line) and line.strip().startswith(fence):
            if pending:  # a continuation into the closing fence
                commands += _split(doc, start, pending, False)
            fence, pending = None, ''
            continue
        if language.lower() not in SHELL_FENCES:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith('\\'):
            pending += line.rstrip()[:-1] + ' '
            continue
        commands += _split(doc, start, pending + line, False)
        pending = ''
    return commands


def _inline_commands(doc: str) -> list[Command]:
    text = '\n'.join(_outside_fences((ROOT / doc).read_text().splitlines()))
    commands = []
    for match in re.finditer(r'(?<!`)`([^`]+)`(?!`)', text):
        span = ' '.join(match.group(1).split())
        if TOOL_LINE.match(span):
            line = text.count('\n', 0, match.start()) + 1
            commands += _split(doc, line, span, True)
    return commands


def collect_commands() -> list[Command]:
    return [c for doc in DOCS for c in (*_fenced_commands(doc), *_inline_commands(doc))]


COMMANDS = collect_commands()


def command_id(command: Command) -> str:
    """``doc:line``, and the command's first word where one line holds several commands."""
    same_line = [c for c in COMMANDS if (c.doc, c.line) == (command.doc, command.line)]
    suffix = f':{command.words[0]}' if len(same_line) > 1 and command.words else ''
    return f'{command.doc}:{command.line}{suffix}'


class _Built(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


class _BadArguments(Exception):
    pass


@functools.cache
def tool_parser(name: str) -> argparse.ArgumentParser:
    """The parser ``nat_mm.tools.<name>.parse_args`` builds, caught before it parses anything."""
    module = importlib.import_module(f'nat_mm.tools.{name}')

    def built(self, *args, **kwargs):
        raise _Built(self)

    with mock.patch.object(argparse.ArgumentParser, 'parse_args', built):
        try:
            module.parse_args([])
        except _Built as done:
            return done.parser
    raise AssertionError(f'nat_mm.tools.{name}.parse_args built no ArgumentParser')


def parse(name: str, argv: list[str]) -> argparse.Namespace:
    """``argv`` through the tool's parser; an argparse error raises :class:`_BadArguments`."""
    parser = tool_parser(name)

    def error(message):
        raise _BadArguments(message)

    with mock.patch.object(parser, 'error', error):
        return parser.parse_args(argv)


def argument_lists(words: list[str]) -> list[list[str]]:
    """The argument lists a documented command line stands for: optional parts (``[--tta]``)
    taken, each alternative of ``{a,b,c}``, ``...`` dropped (``key=value`` after --cfg-options).
    """
    choices, optional = [], False
    for word in words:
        if word.startswith('[-'):
            word, optional = word[1:], True
        if optional and word.endswith(']'):
            word, optional = word[:-1], False
        if word == '...':
            if choices and choices[-1] == ['--cfg-options']:
                choices.append(['key=value'])
            continue
        alternatives = re.fullmatch(r'\{([^{}]*,[^{}]*)\}', word)
        choices.append(alternatives.group(1).split(',') if alternatives else [word])
    return [list(argv) for argv in itertools.product(*choices)]


def check_paths(command: Command) -> None:
    """Every configs/ or tools/ path a command names exists (in shell blocks and prose alike)."""
    for word in command.words:
        for path in re.findall(r'(?:^|[=\[])((?:configs|tools)/[^\s\]\[]+)', word):
            if '/NAME.' in path or path.rstrip('/') in ('configs', 'tools'):
                continue
            assert (ROOT / path).exists(), f'{command.doc}:{command.line}: no file {path}'


def check_tool(command: Command, name: str, argv: list[str]) -> None:
    where = f'{command.doc}:{command.line}: {command.text.strip()}\n'
    assert name in TOOL_NAMES, f'{where}no tool nat_mm/tools/{name}.py'
    for variant in argument_lists(argv):
        try:
            args = parse(name, variant)
        except _BadArguments as error:
            pytest.fail(f'{where}tools/{name}.py rejects {variant}: {error}')
        config = getattr(args, 'config', None)
        if config and not config.isupper():  # CONFIG is a placeholder
            assert config.startswith('configs/'), f'{where}config {config} is not under configs/'
            assert (ROOT / config).is_file(), f'{where}no config {config}'


def tool_of(words: tuple[str, ...]) -> tuple[str, list[str]] | None:
    """(tool name, its arguments) for a tool command line, else None."""
    if words[0] in PYTHONS and len(words) > 1:
        script = re.fullmatch(r'tools/(\w+)\.py', words[1])
        if script:
            assert (ROOT / words[1]).is_file(), f'no script {words[1]}'
            return script.group(1), list(words[2:])
        if words[1] == '-m' and len(words) > 2 and words[2].startswith('nat_mm.tools.'):
            return words[2].removeprefix('nat_mm.tools.'), list(words[3:])
    if words[0].startswith('nat-mm-') and words[0] in ENTRY_POINTS:
        return ENTRY_POINTS[words[0]], list(words[1:])
    return None


def skip_reason(text: str) -> str | None:
    return next((reason for pattern, reason in SKIPS if re.search(pattern, text)), None)


@pytest.mark.parametrize('command', COMMANDS, ids=command_id)
def test_documented_command(command):
    assert not command.error, f'{command.doc}:{command.line}: cannot split: {command.error}'
    words, line = command.words, ' '.join(command.words)
    check_paths(command)
    reason = skip_reason(line)
    if reason:
        if words[0] == 'make':
            targets = re.findall(r'^([\w-]+):', (ROOT / 'Makefile').read_text(), re.MULTILINE)
            for target in (w for w in words[1:] if '=' not in w and not w.startswith('-')):
                assert target in targets, f'{command.doc}:{command.line}: no make target {target}'
        pytest.skip(reason)
    if words[0] == 'bash' and len(words) > 1 and words[1] in LAUNCHERS:
        name, forwarded, needed = LAUNCHERS[words[1]]
        assert (ROOT / words[1]).is_file(), f'no script {words[1]}'
        assert len(words) - 2 >= needed, f'{command.doc}:{command.line}: {words[1]} needs {needed}'
        check_tool(command, name, forwarded(list(words[2:])))
        return
    if words[0].startswith('--'):  # arguments to add to a train / test command line
        check_tool(command, 'train', ['CONFIG', *words])
        check_tool(command, 'test', ['CONFIG', 'CHECKPOINT', *words])
        return
    tool = tool_of(words)
    assert tool, (
        f'{command.doc}:{command.line}: no check applies to {line!r} (an unknown tool or entry '
        'point?): make it a tool command line or add a pattern and its reason to SKIPS'
    )
    name, argv = tool
    if command.inline and not argv:
        assert name in TOOL_NAMES, f'{command.doc}:{command.line}: no tool {name}'
        pytest.skip('names a tool without arguments (the tool is checked to exist)')
    check_tool(command, name, argv)


def test_commands_found():
    """The extraction finds the commands (a broken fence or regex would silently find none)."""
    per_doc = {doc: sum(c.doc == doc for c in COMMANDS) for doc in DOCS}
    for doc in ('README.md', 'configs/README.md', 'docs/usage.md'):
        assert per_doc[doc] >= 2, per_doc
    assert sum(bool(TOOL_LINE.match(' '.join(c.words))) for c in COMMANDS) >= 15


@pytest.mark.parametrize('doc', DOCS)
def test_code_fences_stand_alone(doc):
    """A fence line holds only the fence and a language: text after a closing fence makes the
    rest of the document (prose and commands) one code block."""
    lines = (ROOT / doc).read_text().splitlines()
    fences = [(n, line) for n, line in enumerate(lines, 1) if FENCE_OPEN.match(line)]
    bad = [f'{doc}:{n}: {line}' for n, line in fences if not FENCE_LINE.fullmatch(line)]
    assert not bad, bad
    assert len(fences) % 2 == 0, f'{doc}: a code fence is not closed'


@pytest.mark.parametrize('doc', DOCS)
def test_no_tool_command_outside_a_shell_block(doc):
    """Indented code blocks escape the checks above: tool commands go in ```bash blocks."""
    lines = _outside_fences((ROOT / doc).read_text().splitlines())
    bad = [
        f'{doc}:{n}: {line.strip()}'
        for n, line in enumerate(lines, 1)
        if line.startswith('    ') and TOOL_LINE.match(line.strip())
    ]
    assert not bad, bad


@pytest.mark.parametrize('doc', DOCS)
def test_dtype_values_are_accepted(doc):
    from nat_mm.analysis.benchmark import DTYPES

    text = (ROOT / doc).read_text()
    assert not re.search(r'--dtype[ =]bf16\b', text), f'{doc}: --dtype bf16 (use bfloat16)'
    for match in re.finditer(r'--dtype[ =]+([\w|]+)', text):
        line = text.count('\n', 0, match.start()) + 1
        for value in match.group(1).split('|'):
            assert value in DTYPES, f'{doc}:{line}: --dtype {value} (accepted: {DTYPES})'


@pytest.mark.parametrize('doc', DOCS)
def test_named_files_exist(doc):
    """Every configs/ path named anywhere in the document and every relative link exists."""
    path = ROOT / doc
    text = path.read_text()
    missing = [
        name
        for name in re.findall(r'(?<![\w/.])configs/[\w./-]+\.py', text)
        if not (ROOT / name).is_file()
    ]
    for target in re.findall(r'\]\(([^)\s]+)\)', text):
        if re.match(r'^(https?:|mailto:|#)', target):
            continue
        if not (path.parent / target.split('#')[0]).exists():
            missing.append(target)
    assert not missing, f'{doc}: {missing}'


def test_the_checks_reject_what_they_should():
    """The checks above fail on the mistakes they exist for (on commands made up here)."""
    bad = {
        '.venv/bin/python tools/benchmark.py --backbone nat-tiny --dtype bf16': 'invalid choice',
        '.venv/bin/python tools/train.py CONFIG --no-such-flag': 'unrecognized arguments',
        'python tools/test.py configs/mmdet/nat/no-such-config.py CKPT': 'no file',
        'python tools/no_such_tool.py --help': 'no file tools/no_such_tool.py',
        'nat-mm-no-such-tool': 'no check applies',
        'bash tools/dist_train.sh CONFIG 2 --no-such-flag': 'unrecognized arguments',
    }
    for text, message in bad.items():
        (command,) = _split('made-up.md', 1, text, False)
        with pytest.raises((AssertionError, pytest.fail.Exception), match=message):
            test_documented_command(command)
    assert not FENCE_LINE.fullmatch('``` To put a new head on NAT, inherit one of our configs')
