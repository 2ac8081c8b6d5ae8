"""RL engine: tasks, rollout sampler, GRPO/DAPO/GSPO learner, replay modes, metrics."""
