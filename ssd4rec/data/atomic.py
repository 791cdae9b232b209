"""Checks on a RecBole atomic .inter file before RecBole reads it.

RecBole fails on a missing column or an empty file with a KeyError or an
IndexError from deep inside pandas; checking the header first gives one clear
message that names the file.
"""

from pathlib import Path

from ssd4rec.errors import SSD4RecError

REQUIRED_FIELDS = ("user_id:token", "item_id:token", "timestamp:float")


def check_inter_file(path, required=REQUIRED_FIELDS):
    """Raise SSD4RecError unless ``path`` has a header with ``required`` and at least one row."""
    path = Path(path)
    if not path.is_file():
        raise SSD4RecError(f"{path}: file not found")
    with open(path, encoding="utf-8", errors="replace") as handle:
        header = handle.readline().rstrip("\r\n")
        first_row = handle.readline().strip()
    if not header:
        raise SSD4RecError(f"{path}: the file is empty; expected a header line {chr(9).join(required)!r} and rows")
    columns = header.split("\t")
    missing = [field for field in required if field not in columns]
    if missing:
        raise SSD4RecError(
            f"{path} line 1: missing column(s) {', '.join(missing)}; the header has {', '.join(columns)} "
            f"(tab-separated RecBole atomic format expected)"
        )
    if not first_row:
        raise SSD4RecError(f"{path}: the header is there but there are no interactions")
