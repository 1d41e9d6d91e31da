"""The algorithms' arithmetic as small pure functions over tensors, with METHOD.md's equation
numbers: no models, no messages."""
