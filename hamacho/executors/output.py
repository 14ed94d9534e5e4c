"""Where predict rows go: stdout (JSON lines), FILE.jsonl, or FILE.parquet (pyarrow)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from hamacho.errors import OutputError, UsageError

Write = Callable[[dict[str, Any]], None]
_BATCH = 256  # parquet rows per row group: written as they finish, not all at the end


@contextlib.contextmanager
def open_output(path: str | None) -> Iterator[Write]:
    """A function writing one row at a time, flushed as it goes."""
    if path is None:
        yield lambda row: click.echo(json.dumps(row))
        return
    target = Path(path)
    if target.suffix not in (".jsonl", ".parquet"):
        raise UsageError(f"--output '{path}' must end in .jsonl or .parquet")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
    except OSError as exc:
        raise OutputError(
            f"cannot write '{path}' ({exc.strerror}); choose another --output"
        ) from None
    if target.suffix == ".parquet":
        with _parquet(target) as write:
            yield write
        return
    with target.open("w") as f:

        def write(row: dict[str, Any]) -> None:
            f.write(json.dumps(row) + "\n")
            f.flush()

        yield write


@contextlib.contextmanager
def _parquet(target: Path) -> Iterator[Write]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(
            "--output FILE.parquet needs pyarrow: pip install 'hamacho[ray]'"
        ) from None
    schema = pa.schema(
        [
            ("path", pa.string()),
            ("score", pa.float64()),
            ("threshold", pa.float64()),
            ("is_anomalous", pa.bool_()),
            ("error", pa.string()),
            ("map", pa.string()),
        ]
    )
    pending: list[dict[str, Any]] = []
    with pq.ParquetWriter(target, schema) as writer:

        def flush() -> None:
            columns = {name: [row.get(name) for row in pending] for name in schema.names}
            writer.write_table(pa.table(columns, schema=schema))
            pending.clear()

        def write(row: dict[str, Any]) -> None:
            pending.append(row)
            if len(pending) >= _BATCH:
                flush()

        yield write
        if pending:
            flush()
