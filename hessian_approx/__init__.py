"""What both frameworks share without importing either: the architecture description, errors, atomic files."""
