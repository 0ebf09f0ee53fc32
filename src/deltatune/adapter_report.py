"""`deltatune inspect`'s reader under its earlier name: it lives in io/inspect.py (formats are io/'s alone)."""

from .io.inspect import (
    SOURCES,
    AdapterInfo,
    Verdict,
    adapter_report,
    check_adapter,
    format_report,
    serving_compatibility,
)

__all__ = ["SOURCES", "AdapterInfo", "Verdict", "adapter_report", "check_adapter", "format_report",
           "serving_compatibility"]
