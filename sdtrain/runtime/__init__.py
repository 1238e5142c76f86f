"""Process plumbing, the lowest layer: quiet logs, seeds, device helpers, loggers, preemption, the sweep table."""
