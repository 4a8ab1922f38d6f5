"""Thin entry points for `ray job submit`; the logic lives in raytrain/."""
