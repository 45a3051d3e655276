"""Autogenerate a revision against :mod:`node.schema`: ``python -m node.migrations "message"``."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from alembic import command

from node.db import alembic_config, make_engine, upgrade


def main(message: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        engine = make_engine(f"sqlite:///{Path(d) / 'head.sqlite3'}")
        upgrade(engine)  # an empty catalog at the current head
        with engine.begin() as conn:
            cfg = alembic_config(conn)
            cfg.set_main_option("file_template", "%%(rev)s_%%(slug)s")
            number = len(list((Path(__file__).parent / "versions").glob("[0-9]*.py"))) + 1
            command.revision(cfg, message=message, autogenerate=True, rev_id=f"{number:04d}")
        engine.dispose()


if __name__ == "__main__":
    main(" ".join(sys.argv[1:]) or "catalog change")
