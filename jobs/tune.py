"""Entry point for `ray job submit -- python -m jobs.tune --config jobs/configs/<recipe>.yaml [key=value …]`."""

from raytrain.stages import stage_main

if __name__ == "__main__":
    raise SystemExit(stage_main("tune"))
