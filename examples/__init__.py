"""Example trainers, run from the repository root, e.g.

    .venv/bin/tapekit-train --trainer=examples.wgan_gp:WGANGPTrainer
    .venv/bin/tapekit-train --trainer=examples.custom_loss_classifier:FocalLossClassifier

Not installed with tapekit: copy one as the start of your own trainer.
"""
