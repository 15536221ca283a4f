"""A plugin module that fails at import time, as user code sometimes does."""

raise ImportError("No module named 'definitely_missing_dependency'")
