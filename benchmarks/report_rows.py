"""Puts one side benchmark's rows into the bench report (benchmarks/results.json), under
`key`, for `bench.py`'s README block: `put(path, key, rows)`."""

import json


def put(path: str, key: str, rows) -> None:
    with open(path) as stream:
        report = json.load(stream)
    report[key] = rows
    with open(path, "w") as stream:
        json.dump(report, stream, indent=2)
