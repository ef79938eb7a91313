"""The label convention every stage shares."""

IGNORE_INDEX = -100  # label value the loss skips (transformers' and torch's convention)
