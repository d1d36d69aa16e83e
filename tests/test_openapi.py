from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_committed_openapi_matches_the_app() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "export_openapi.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr + "\nrun `make openapi` and commit the result"


def test_every_api_operation_documents_the_error_envelope() -> None:
    document = json.loads((ROOT / "openapi" / "openapi.json").read_text())
    ids: list[str] = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            ids.append(operation["operationId"])
            if not path.startswith("/v1/"):
                continue
            for status in ("401", "404", "422", "500"):
                schema = operation["responses"][status]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path)
            assert operation.get("security"), f"{method} {path} documents no auth"
    assert len(ids) == len(set(ids)), "operation ids must be unique"
