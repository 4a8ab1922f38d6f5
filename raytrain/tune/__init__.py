"""Ray Tune sweeps over a training stage: `raytrain tune -c RECIPE` (see `sweep.py`)."""
