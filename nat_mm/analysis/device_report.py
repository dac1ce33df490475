"""The report of ``tools/device_check.sh``: CUDA test results and GPU benchmarks, in Markdown and
JSON, with the issue's targets checked.

Reads what the device check left in its output folder:

- ``cuda-tests.xml``: pytest's JUnit XML of the CUDA tests;
- ``na_<dtype>.json``: ``benchmark_na --json`` (NAT-T / DiNAT-T layers at 800x1216);
- ``backbone_<dtype>.json``: ``benchmark --backbone nat-tiny --json`` (NAT-T vs Swin-T);
- ``environment.json``: torch, CUDA, GPU, NATTEN versions.

Writes ``report.md`` and ``figures.json`` beside them. Targets: ``flex`` with RPB within 1.3x of
the best NATTEN kernel without RPB (forward + backward), and the NAT-T training step no slower than
Swin-T's. ``python -m nat_mm.analysis.device_report OUT_DIR``.
"""

from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ElementTree

FLEX_TARGET = 1.3  # flex (with RPB) / best NATTEN kernel (without RPB), forward + backward
TRAIN_TARGET = 1.0  # NAT-T training step / Swin-T training step


def read_junit(path: str) -> dict:
    """Counts and failed test names of a pytest JUnit XML file (empty counts if it is missing)."""
    summary = {'tests': 0, 'passed': 0, 'failed': 0, 'skipped': 0, 'failures': [], 'skips': []}
    if not os.path.isfile(path):
        return summary
    for case in ElementTree.parse(path).getroot().iter('testcase'):
        name = f'{case.get("classname", "")}::{case.get("name", "")}'
        summary['tests'] += 1
        failure = case.find('failure') if case.find('failure') is not None else case.find('error')
        if failure is not None:
            summary['failed'] += 1
            summary['failures'].append(f'{name}: {(failure.get("message") or "")[:300]}')
        elif case.find('skipped') is not None:
            summary['skipped'] += 1
            summary['skips'].append(f'{name}: {case.find("skipped").get("message", "")[:200]}')
        else:
            summary['passed'] += 1
    return summary


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _ms(value: float | None) -> str:
    return f'{value * 1e3:.2f}' if value else '-'


def na_table(report: dict) -> tuple[list[str], list[dict]]:
    """Markdown rows of one benchmark_na run and the flex-vs-NATTEN ratios per layer."""
    by_layer: dict[str, dict[str, dict]] = {}
    for row in report['rows']:
        by_layer.setdefault(row['layer'], {})[row['method']] = row
    lines = [
        '| layer | method | fwd ms | fwd+bwd ms | mem MiB | fwd+bwd vs window |',
        '|---|---|---|---|---|---|',
    ]
    ratios = []
    for layer, methods in by_layer.items():
        window = methods.get('window', {}).get('fwd_bwd')
        for name, row in methods.items():
            versus = f'{row["fwd_bwd"] / window:.2f}' if row.get('fwd_bwd') and window else '-'
            memory = f'{row["mem"] / 2**20:.1f}' if row.get('mem') else '-'
            lines.append(
                f'| {layer} | {name} | {_ms(row.get("fwd"))} | {_ms(row.get("fwd_bwd"))} | '
                f'{memory} | {versus} |'
            )
        natten = methods.get('natten', {}).get('fwd_bwd')
        flex = methods.get('flex', {}).get('fwd_bwd')
        if natten and flex:
            ratios.append({'layer': layer, 'flex_vs_natten': flex / natten})
    return lines, ratios


def backbone_lines(report: dict) -> tuple[list[str], float | None]:
    """Markdown rows of one backbone benchmark and the train-step time ratio NAT-T / Swin-T."""
    lines = [
        '| mode | model | s/iter | peak MiB | of GEMM rate |',
        '|---|---|---|---|---|',
    ]
    seconds = {}
    for row in report['rows']:
        share = f'{row["of_gemm_rate"]:.0%}' if row.get('of_gemm_rate') is not None else '-'
        lines.append(
            f'| {row["mode"]} | {row["label"]} | {row["seconds"]:.4f} | '
            f'{row["peak_memory_mib"]:.0f} | {share} |'
        )
        seconds[(row['mode'], row['model'] == 'swin-tiny')] = row['seconds']
    train = None
    if ('train', False) in seconds and ('train', True) in seconds:
        train = seconds[('train', False)] / seconds[('train', True)]
    return lines, train


def write_report(folder: str) -> dict:
    """Writes ``report.md`` and ``figures.json`` in ``folder``; returns the figures."""
    figures: dict = {'environment': _read_json(os.path.join(folder, 'environment.json'))}
    lines = ['# nat_mm device check', '']
    if figures['environment']:
        lines += ['| | |', '|---|---|']
        lines += [f'| {key} | {value} |' for key, value in figures['environment'].items()]
        lines.append('')
    tests = read_junit(os.path.join(folder, 'cuda-tests.xml'))
    figures['cuda_tests'] = tests
    lines += [
        '## CUDA tests',
        '',
        f'{tests["passed"]} passed, {tests["failed"]} failed, {tests["skipped"]} skipped '
        f'(of {tests["tests"]}).',
        '',
    ]
    lines += [f'- FAILED {failure}' for failure in tests['failures']]
    lines += [f'- skipped {skip}' for skip in tests['skips']]
    targets = []
    for dtype in ('bfloat16', 'float16', 'float32'):
        report = _read_json(os.path.join(folder, f'na_{dtype}.json'))
        if report is None:
            continue
        table, ratios = na_table(report)
        figures[f'na_{dtype}'] = {'rows': report['rows'], 'flex_vs_natten': ratios}
        lines += ['', f'## Neighborhood attention, {dtype} (NAT-T / DiNAT-T layers, 800x1216)', '']
        lines += table
        if ratios:
            worst = max(ratios, key=lambda r: r['flex_vs_natten'])
            targets.append(
                f'flex (RPB) / best NATTEN (no RPB), {dtype}: worst {worst["flex_vs_natten"]:.2f}x '
                f'({worst["layer"]}), target <= {FLEX_TARGET}: '
                f'{"met" if worst["flex_vs_natten"] <= FLEX_TARGET else "MISSED"}'
            )
    for dtype in ('bfloat16', 'float32'):
        report = _read_json(os.path.join(folder, f'backbone_{dtype}.json'))
        if report is None:
            continue
        table, train = backbone_lines(report)
        figures[f'backbone_{dtype}'] = {'rows': report['rows'], 'train_ratio': train}
        lines += ['', f'## NAT-T vs Swin-T backbone, {dtype} autocast', '', *table]
        if train is not None:
            targets.append(
                f'NAT-T / Swin-T training step, {dtype}: {train:.2f}, target <= {TRAIN_TARGET}: '
                f'{"met" if train <= TRAIN_TARGET else "MISSED"}'
            )
    figures['targets'] = targets
    lines += ['', '## Targets', ''] + [f'- {target}' for target in targets or ['no figures']]
    with open(os.path.join(folder, 'report.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    with open(os.path.join(folder, 'figures.json'), 'w') as f:
        json.dump(figures, f, indent=2)
    return figures


if __name__ == '__main__':
    write_report(sys.argv[1])
    with open(os.path.join(sys.argv[1], 'report.md')) as report_file:
        print(report_file.read())
