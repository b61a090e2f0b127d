"""Ferry's benchmark: `python -m bench --help`."""
