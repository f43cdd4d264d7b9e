"""Communication: what goes over the air, measured in bytes."""
