"""Runtime: loaded models, the scheduler and generation."""
