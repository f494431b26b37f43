"""Which global model the run ends with: each one is scored from the sites' evaluations of it
(lowest smoothed aggregated validation loss, or the study's other criterion), the plateau
schedule steps on the score (learning rate, early stopping), and the best so far is kept."""

from __future__ import annotations

from flwr.app import ArrayRecord, MetricRecord, RecordDict

from medfed.common.messages import METRICS, WEIGHT_KEY
from medfed.common.schedule import PlateauSchedule, selection_score
from medfed.server.aggregation import mean_scalar_metrics
from medfed.server.records import RoundRecord


class ModelSelection:
    def __init__(self, schedule: PlateauSchedule, *, criterion: str) -> None:
        self.schedule = schedule
        self.criterion = criterion
        self.best_arrays: ArrayRecord | None = None

    def judge(self, record: RoundRecord, arrays: ArrayRecord) -> MetricRecord | None:
        """Aggregate the sites' evaluations of the global model after `record.round` (`arrays`)
        into `record` and let the schedule judge it; keep it when it is the best so far."""
        evaluations = [RecordDict({METRICS: MetricRecord(m)}) for _, m in sorted(record.evaluate.items())]
        aggregated = mean_scalar_metrics(evaluations, WEIGHT_KEY) if evaluations else None
        record.val_loss = float(aggregated["val-loss"]) if aggregated else float("nan")
        record.val_auc = float(aggregated["val-auc"]) if aggregated else float("nan")
        score = selection_score(loss=record.val_loss, auc=record.val_auc, criterion=self.criterion)
        if self.schedule.step(record.round, score) or self.best_arrays is None:
            self.best_arrays = arrays
        return aggregated
