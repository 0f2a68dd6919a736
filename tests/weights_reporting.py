"""A user trainer for subprocess tests: prints its final weights as one JSON line."""

import json

from tapekit.trainers import RegressionTrainer


class WeightsReportingRegression(RegressionTrainer):
    def results_summary(self):
        weights = [v.numpy().tolist() for v in self.model.trainable_variables]
        return "WEIGHTS " + json.dumps({"step": self.current_step, "weights": weights})
