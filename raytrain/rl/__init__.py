"""Online RL (PPO, GRPO) on raytrain's training loop: rollout engines, reward and reference roles, algorithms."""
