"""What the server and its clients agree on beyond the JSON schemas: media types and the
column names of a predicted CSV.

Both ``trainserve.serving`` (which writes the answers) and ``trainserve.client`` (which
reads and writes them) import this module, so it imports nothing: no torch, no FastAPI.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

NPY_MEDIA_TYPE = "application/x-npy"
CSV_MEDIA_TYPE = "text/csv"
# What a cell of a CSV to predict may say for "missing" (pandas writes an empty cell): read so
# by the server's CSV /predict and by `trainserve predict`, which sends such a cell as null.
MISSING_TOKENS = frozenset({"", "NA", "N/A", "NaN", "nan", "null", "NULL", "None", "-"})
# GET /models/{id}/export?format=...: what the server builds and the CLI offers.
ExportFormat = Literal["torchscript", "torch.export"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = ("torchscript", "torch.export")


def prediction_columns(targets: Sequence[str], classes: Sequence[Any] | None) -> list[str]:
    """The columns a predicted CSV adds after the input columns, from HTTP and the CLI alike.

    ``predicted_<target>`` names what is predicted and cannot collide with an input column
    called ``prediction``; a classifier adds ``probability_<class>`` per class.
    """
    names = [f"predicted_{target}" for target in targets]
    if classes is not None:
        names = names[:1] + [f"probability_{label}" for label in classes]
    return names
