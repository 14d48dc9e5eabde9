"""What every stage shares: errors, argument checks, devices, ranks, progress."""
