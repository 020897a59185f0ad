"""Frozen-backbone fast path: extract backbone features once, cache them, train heads on them."""
