"""Pure, stateless loss functions on tensors. Each docstring states the formula and cites its source."""
