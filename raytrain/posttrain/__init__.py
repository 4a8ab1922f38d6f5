"""Post-training: SFT / preference data preparation, tasks and stages built on the shared training loop."""
