"""Training students on stored or online labels: loop, losses, targets, runs."""
