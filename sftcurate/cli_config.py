"""`sftcurate config show|init`: the effective configuration, or one with every field at its default. Imported
when the command runs: the config models load the selector registry (torch among it)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from sftcurate.cli_common import caught, fail, stop
from sftcurate.cli_io import console, out, write_json
from sftcurate.core.config import CompareConfig, CurateConfig, dump_config, load_compare_config, load_config


def show(config: Optional[Path], overrides: list[str], compare_config: bool, json_out: Optional[str]) -> None:
    try:
        cfg = load_compare_config(config, overrides) if compare_config else load_config(config, overrides)
    except caught() as exc:
        stop(exc)
    if json_out:
        write_json(json_out, cfg.model_dump(mode="json"))
    if json_out != "-":
        out.print(dump_config(cfg), markup=False, highlight=False, soft_wrap=True)


def init(out_path: Path, compare_config: bool, json_out: Optional[str]) -> None:
    if out_path.exists():
        fail(FileExistsError(f"{out_path}: exists; choose another --out or remove it"))
    out_path.write_text(dump_config(CompareConfig() if compare_config else CurateConfig(), described=True))
    if json_out:
        write_json(json_out, {"wrote": str(out_path), "kind": "compare" if compare_config else "curate"})
    console.print(f"wrote {out_path}", markup=False, highlight=False)
