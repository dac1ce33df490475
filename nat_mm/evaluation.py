"""Evaluation metrics that report what the host libraries only print.

``type='ClasswiseIoUMetric'`` (mmseg's ``METRICS``; a config names ``nat_mm.evaluation`` in its
``custom_imports``) is mmseg's ``IoUMetric`` whose results also hold every class's figures,
``IoU.<class>`` and ``Acc.<class>`` (percent, as the printed per-class table), so that
``test.py --metrics-json`` keeps them.
"""

from __future__ import annotations

from mmseg.evaluation import IoUMetric
from mmseg.registry import METRICS


@METRICS.register_module()
class ClasswiseIoUMetric(IoUMetric):
    """mmseg's ``IoUMetric`` (same arguments) plus per-class results."""

    def compute_metrics(self, results: list) -> dict[str, float]:
        metrics = super().compute_metrics(results)
        if self.format_only:
            return metrics
        # results: one (intersect, union, pred_area, label_area) per image, each [num_classes].
        totals = [sum(column) for column in zip(*results, strict=True)]
        per_class = self.total_area_to_metrics(*totals, self.metrics, self.nan_to_num, self.beta)
        for name, values in per_class.items():
            if name == 'aAcc':
                continue
            for class_name, value in zip(self.dataset_meta['classes'], values, strict=True):
                metrics[f'{name}.{class_name}'] = round(float(value) * 100, 2)
        return metrics
