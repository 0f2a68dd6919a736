#!/usr/bin/env bash
# Renders the two screenshots of docs/performance.md with TensorBoard itself, in headless
# Chromium (Debian: apt-get install chromium). Run from the repository root after `make install`:
#   bash docs/images/screenshots.sh
# Offline, the Profile tab's step-time graph stays empty: TensorBoard's profile plugin loads
# Google Charts from www.gstatic.com. The numbers beside it are there.
set -euo pipefail
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
export TF_CPP_MIN_LOG_LEVEL=2
# Two runs of the seed MLP with different learning rates: two rows in the HParams dashboard.
for rate in 0.01 0.05; do
  .venv/bin/tapekit-train --trainer=regression --model=mlp --model_dir="$WORK/sweep/lr$rate" \
    --learning_rate=$rate --train_steps=600 --steps_per_loop=50 --eval_every_steps=200 \
    --best_metric=loss --progress=none
done
# An input pipeline made slow on purpose (tests/test_profile.py), profiled at steps 21-40.
.venv/bin/python - "$WORK/slow_input" <<'PY'
import sys
sys.path.insert(0, "tests")
from test_profile import slow_batches
from tapekit.trainers import RegressionTrainer
RegressionTrainer(model="mlp", model_dir=sys.argv[1], profile_steps=(21, 40), progress="none").fit(
    train_steps=40, steps_per_loop=10, dataset=slow_batches(milliseconds=30))
PY
shoot() {  # shoot LOGDIR PORT TAB WIDTH,HEIGHT OUTPUT
  .venv/bin/tensorboard --logdir "$1" --port "$2" --host 127.0.0.1 >"$WORK/tb-$2.log" 2>&1 &
  until curl -sf "http://127.0.0.1:$2/data/plugins_listing" >/dev/null; do sleep 1; done
  sleep 5  # the first read of the event files
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$WORK/chromium-$2" --window-size="$4" --virtual-time-budget=30000 \
    --screenshot="$5" "http://127.0.0.1:$2/#$3" 2>/dev/null
}
shoot "$WORK/sweep" 6031 hparams 2600,420 docs/images/hparams.png
shoot "$WORK/slow_input" 6032 profile 1600,1300 docs/images/profile-overview.png
