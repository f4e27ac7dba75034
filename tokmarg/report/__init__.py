"""`tokmarg report`: tables and plots of one or more finished runs (SPEC §3-4, §6).

:mod:`inputs` reads and combines run directories, :mod:`tables` computes the numbers,
:mod:`plots` draws them, :mod:`render` writes Markdown and HTML, :mod:`build` puts it together.
"""

from tokmarg.report.build import ReportFiles, write_report
from tokmarg.report.inputs import ReportError, ReportInputs, load_inputs

__all__ = ["ReportError", "ReportFiles", "ReportInputs", "load_inputs", "write_report"]
