"""`sftcurate export`: from whatever handle the user has to the selected records in their trainer's format.
Imported when the command runs: the exporters load the selection code (torch among it)."""
from __future__ import annotations

from typing import Optional

from sftcurate.cli_common import caught, emit, stop
from sftcurate.cli_io import stdout_for_json
from sftcurate.core.export import export as export_records
from sftcurate.core.locate import locate_selection


def export(selection: str, out_path: str, fmt: str, push_to_hub: Optional[str], overwrite: bool,
           json_out: Optional[str]) -> None:
    try:
        with stdout_for_json(json_out):
            found = locate_selection(selection)
            result = {**export_records(found.selection_uri, out_path, fmt, push_to_hub, overwrite),
                      "selection_uri": found.selection_uri, "found_by": found.how}
    except caught() as exc:
        stop(exc)
    emit("export", result, json_out)
