"""Small lm-eval tasks that ship with raytrain (YAML + JSONL here), run offline through lm-eval's TaskManager:
`TaskManager(include_path=str(TASKS_DIR))`, then `tasks=list(DEMO_TASKS)`."""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
DEMO_TASKS = ("raytrain_demo_mc", "raytrain_demo_gen")
