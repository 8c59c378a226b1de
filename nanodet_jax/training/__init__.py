"""Training: state and step, the loop, optimizers, schedules, EMA, devices and hosts."""
