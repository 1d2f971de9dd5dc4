"""What runs report: tables, hardware facts and benchmark reports (`tables`), and the training
run's figures (`training`): loss curves, validation sheets and the attention panels that show
where each reference's annotated points attend in the target.

Every name is importable from ``mosaic_kit.reporting``.
"""

from .tables import PeakMemory, format_table, hardware_info, run_in_fresh_process, write_report
from .training import attention_panels, plot_loss_curves, validation_sheet

__all__ = [
    "PeakMemory",
    "attention_panels",
    "format_table",
    "hardware_info",
    "plot_loss_curves",
    "run_in_fresh_process",
    "validation_sheet",
    "write_report",
]
