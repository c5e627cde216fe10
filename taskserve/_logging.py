"""Logging set-up of ``taskserve serve`` and ``taskserve worker``: plain text, or one JSON object a line.

JSON lines are for log collectors (Loki, CloudWatch, Elasticsearch), which then need no parser
of their own; a failure's traceback travels in its own field rather than over many lines.
The chosen format and level are put in the environment, so worker processes started by the
supervisor log the same way.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import Literal

LogFormat = Literal["text", "json"]
FORMAT_ENV = "TASKSERVE_LOG_FORMAT"
LEVEL_ENV = "TASKSERVE_LOG_LEVEL"
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s[%(process)d]: %(message)s"


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["traceback"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup(level: str, fmt: LogFormat = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
    os.environ[FORMAT_ENV] = fmt
    os.environ[LEVEL_ENV] = level
