"""Operator tooling: submit stages as KubeRay RayJobs, list them, roll the RayService's models."""
