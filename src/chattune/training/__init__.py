"""Training: the run's settings, the one training loop, the objectives that plug into it,
their losses, checkpoints, resume and interrupt handling, and the frozen reference model.
"""
