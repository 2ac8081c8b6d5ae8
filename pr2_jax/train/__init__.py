"""Training: sharded state creation and the jitted supervised step."""
